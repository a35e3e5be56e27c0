"""The deterministic mock model: chunk i is `chunk-{i} `, one every `delay_ms`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ..errors import InvalidRequest, PermanentModelError, TransientModelError
from ..settings import Settings
from . import Prompt

MOCK_OPTIONS = {"chunks", "delay_ms", "fail", "fail_at", "fail_attempts"}
# A bound on one run's size: the reply is held whole in memory and stored as one message.
MAX_MOCK_CHUNKS = 100_000


def mock_reply(chunks: int) -> str:
    return "".join(f"chunk-{i} " for i in range(chunks))


def check_mock_options(options: dict[str, object]) -> None:
    """Refuse options the mock cannot honour, at POST time (400), not mid-run."""
    for key in ("chunks", "fail_at", "fail_attempts"):
        value = options.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise InvalidRequest(f"model_options.{key} must be a non-negative integer")
    chunks = options.get("chunks")
    if isinstance(chunks, int) and chunks > MAX_MOCK_CHUNKS:
        raise InvalidRequest(f"model_options.chunks must be at most {MAX_MOCK_CHUNKS}")
    delay = options.get("delay_ms")
    if delay is not None and (
        not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 60_000
    ):
        raise InvalidRequest("model_options.delay_ms must be a number from 0 to 60000")
    if options.get("fail") not in (None, "transient", "permanent"):
        raise InvalidRequest('model_options.fail must be "transient" or "permanent"')


class MockChunkSource:
    """Options: `chunks`, `delay_ms`; `fail` ("transient"|"permanent") fails at chunk `fail_at`
    (default 0) on the first `fail_attempts` attempts (default: every attempt)."""

    reads_history = False  # the reply depends on the options only

    def __init__(self, settings: Settings) -> None:
        self.chunks = settings.mock_chunks
        self.delay_ms = settings.mock_delay_ms

    async def stream(self, prompt: Prompt) -> AsyncIterator[str]:
        opts = prompt.options
        chunks = int(opts.get("chunks", self.chunks))
        delay = float(opts.get("delay_ms", self.delay_ms)) / 1000
        fail = opts.get("fail")
        fail_at = int(opts.get("fail_at", 0))
        fail_attempts = opts.get("fail_attempts")
        failing = fail is not None and (
            fail_attempts is None or prompt.attempt <= int(fail_attempts)
        )
        for i in range(chunks):
            if failing and i == fail_at:
                if fail == "permanent":
                    raise PermanentModelError("mock model: permanent failure requested")
                raise TransientModelError("mock model: transient failure requested")
            if delay:
                await asyncio.sleep(delay)  # the mock's pacing: one chunk every delay_ms
            yield f"chunk-{i} "
        if failing and fail_at >= chunks:
            raise (PermanentModelError if fail == "permanent" else TransientModelError)(
                f"mock model: {fail} failure requested"
            )
