"""A reply source for bench/capacity.py that streams at an LLM's pace and says when.

`THREADGATE_MODEL=bench.paced_source:make`. Chunk i is due at start + i / rate, on an
absolute schedule, as a model's tokens arrive on a socket whatever the pod is doing: a pod
that falls behind reads them late, and the lateness does not pile up in the schedule. Its
text is `{i}@{due} ` (`due`: wall-clock milliseconds), so a client measures every chunk's lag
from when it was due to when it arrived, whether it came alone or merged with others.

Only the standard library: the pod of an older revision (bench.harness.tree_at) imports it too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from threadgate.sources import number_option


class PacedSource:
    """Options: `chunks` (400), `rate` (chunks per second, 40)."""

    reads_history = False
    continues = False

    def check_options(self, options: dict[str, Any]) -> None:
        unknown = set(options) - {"chunks", "rate"}
        if unknown:
            raise ValueError(f"unknown options: {sorted(unknown)}")
        number_option(options, "chunks", low=0, high=1_000_000, integer=True)
        number_option(options, "rate", low=0.001, high=100_000)

    async def stream(self, prompt: Any) -> AsyncIterator[str]:
        chunks = int(prompt.options.get("chunks", 400))
        rate = float(prompt.options.get("rate", 40))
        loop = asyncio.get_running_loop()
        start_loop, start_wall = loop.time(), time.time()
        for i in range(chunks):
            ahead = start_loop + i / rate - loop.time()
            if ahead > 0:
                await asyncio.sleep(ahead)
            yield f"{i}@{(start_wall + i / rate) * 1000:.1f} "


def make(settings: Any) -> PacedSource:
    return PacedSource()
