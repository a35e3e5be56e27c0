"""A reply source for bench/storage.py: a reply of a known size that PostgreSQL cannot shrink.

`THREADGATE_MODEL=bench.text_source:make`. The reply is `bytes` characters of pseudo-random
lowercase words (seeded by the run's input, so a replay yields the same text), in chunks of
`chunk` characters, as fast as the pod takes them. The mock's `chunk-0 chunk-1 ...` compresses
about tenfold in PostgreSQL's TOAST; a model's prose does not, so storage is measured on this.

Only the standard library: the pod of an older revision (bench.harness.tree_at) imports it too.
"""

from __future__ import annotations

import random
import string
from collections.abc import AsyncIterator
from typing import Any


def text(size: int, seed: str) -> str:
    """`size` characters of letters and spaces: random enough that pglz finds nothing."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    out: list[str] = []
    n = 0
    while n < size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) + " "
        out.append(word)
        n += len(word)
    return "".join(out)[:size]


class TextSource:
    """Options: `bytes` (reply size, 3900), `chunk` (characters per chunk, 40)."""

    reads_history = False
    continues = False

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = set(options) - {"bytes", "chunk"}
        if unknown:
            raise ValueError(f"unknown options: {sorted(unknown)}")

    async def stream(self, prompt: Any) -> AsyncIterator[str]:
        size = int(prompt.options.get("bytes", 3900))
        chunk = int(prompt.options.get("chunk", 40))
        messages = getattr(prompt, "messages", None) or [{"content": ""}]
        reply = text(size, str(messages[-1].get("content", "")))
        for i in range(0, len(reply), chunk):
            yield reply[i : i + chunk]


def make(settings: Any) -> TextSource:
    return TextSource()
