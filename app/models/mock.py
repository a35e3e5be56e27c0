"""The mock model (the default source): chunk i is `chunk-{i} `, one every `delay_ms`.

Deterministic, so every test can check a reply exactly; `vary` makes chunk i of attempt a
`chunk-{i}.{a} `, so a reply mixed from two attempts shows (real models are not
deterministic). It continues a reply exactly: after a prefix of k chunks it yields chunk k on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ..errors import PermanentModelError, TransientModelError
from ..settings import Settings
from ..sources import ContinuationRefused, Data, Part, Prompt, number_option

MOCK_OPTIONS = {
    "chunks",
    "delay_ms",
    "fail",
    "fail_at",
    "fail_attempts",
    "vary",
    "data_every",
    "refuse_continue",
}
# A bound on one run's size: the reply is held whole in memory and stored as one message.
MAX_MOCK_CHUNKS = 100_000
# Each numeric option's range (docs/security.md): (low, high, integer).
NUMERIC_OPTIONS: dict[str, tuple[int, int, bool]] = {
    "chunks": (0, MAX_MOCK_CHUNKS, True),
    "delay_ms": (0, 60_000, False),
    "fail_at": (0, MAX_MOCK_CHUNKS, True),
    "fail_attempts": (0, 1000, True),
    "data_every": (0, MAX_MOCK_CHUNKS, True),
}


def mock_reply(chunks: int, attempts: dict[int, int] | None = None) -> str:
    """The mock's reply of `chunks` chunks. `attempts` (vary): chunk i's attempt is the one
    of the greatest key <= i, e.g. {0: 1, 12: 2}: chunks 0-11 of attempt 1, then attempt 2."""
    if attempts is None:
        return "".join(f"chunk-{i} " for i in range(chunks))
    starts = sorted(attempts)
    return "".join(
        f"chunk-{i}.{attempts[max(s for s in starts if s <= i)]} " for i in range(chunks)
    )


def _streamed(prompt: Prompt) -> int:
    """How many of its items the mock had streamed when the reply was cut: counted in the
    text, since under load several chunks travel as one part (coalescing)."""
    return prompt.prefix.count("chunk-") + sum(isinstance(p, Data) for p in prompt.prefix_parts)


class MockSource:
    """Options: `chunks`, `delay_ms`; `fail` ("transient"|"permanent") fails at chunk `fail_at`
    (default 0) on the first `fail_attempts` attempts (default: every attempt); `vary`;
    `data_every: n` makes every n-th part a data event `tick` {"i", "attempt"};
    `refuse_continue` refuses to continue a reply (the run regenerates it, with a `reset`)."""

    reads_history = False  # the reply depends on the options only
    continues = True

    def __init__(self, settings: Settings) -> None:
        self.chunks = settings.mock_chunks
        self.delay_ms = settings.mock_delay_ms

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse options the mock cannot honour, at POST time (400), not mid-run."""
        unknown = sorted(set(options) - MOCK_OPTIONS)
        if unknown:
            raise ValueError(
                f"the mock takes {', '.join(sorted(MOCK_OPTIONS))}; unknown: {', '.join(unknown)}"
            )
        for key, (low, high, integer) in NUMERIC_OPTIONS.items():
            number_option(options, key, low=low, high=high, integer=integer)
        if options.get("fail") not in (None, "transient", "permanent"):
            raise ValueError('fail must be "transient" or "permanent"')
        for flag in ("vary", "refuse_continue"):
            if not isinstance(options.get(flag, False), bool):
                raise ValueError(f"{flag} must be true or false")

    async def stream(self, prompt: Prompt) -> AsyncIterator[Part]:
        opts = prompt.options
        if prompt.prefix_parts and opts.get("refuse_continue"):
            raise ContinuationRefused("mock model: continuation refused as requested")
        chunks = int(opts.get("chunks", self.chunks))
        delay = float(opts.get("delay_ms", self.delay_ms)) / 1000
        fail = opts.get("fail")
        fail_at = int(opts.get("fail_at", 0))
        fail_attempts = opts.get("fail_attempts")
        failing = fail is not None and (
            fail_attempts is None or prompt.attempt <= int(fail_attempts)
        )
        tag = f".{prompt.attempt}" if opts.get("vary") else ""
        every = int(opts.get("data_every") or 0)
        for i in range(_streamed(prompt), chunks):
            if failing and i == fail_at:
                if fail == "permanent":
                    raise PermanentModelError("mock model: permanent failure requested")
                raise TransientModelError("mock model: transient failure requested")
            if delay:
                await asyncio.sleep(delay)  # the mock's pacing: one chunk every delay_ms
            if every and i % every == every - 1:
                yield Data("tick", {"i": i, "attempt": prompt.attempt})
            else:
                yield f"chunk-{i}{tag} "
        if failing and fail_at >= chunks:
            raise (PermanentModelError if fail == "permanent" else TransientModelError)(
                f"mock model: {fail} failure requested"
            )
