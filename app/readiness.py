"""Dependency checks of /readyz: each bounded in time, run together, one in flight at a time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

logger = logging.getLogger(__name__)


class DependencyCheck:
    """A check of one dependency that answers within a timeout whatever the dependency does.

    A check still running when the timeout comes is not cancelled: the next probe waits on
    the same one instead of starting another. Against a frozen server (SIGSTOP, a black
    hole) a query may hang until the connection's TCP timeouts end it; probes every few
    seconds would otherwise pile one hung query (and one pooled connection) on another.
    """

    def __init__(self, name: str, check: Callable[[], Awaitable[bool]]) -> None:
        self.name = name
        self.check = check
        self._task: asyncio.Task[bool] | None = None

    async def __call__(self, timeout_s: float) -> bool:
        task = self._task
        if task is None or task.done():
            task = self._task = asyncio.create_task(self._run(), name=f"readiness-{self.name}")
        # This probe's check: another probe may begin the next one while this one wakes up.
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        return bool(done) and task.result()

    async def _run(self) -> bool:
        try:
            return bool(await self.check())
        except Exception as exc:  # a failed check is an answer: the dependency is away
            logger.debug("readiness check %s failed: %r", self.name, exc)
            return False


async def check_all(checks: Mapping[str, DependencyCheck], timeout_s: float) -> dict[str, bool]:
    """Every check at once: the answer takes the slowest one's time, at most `timeout_s`."""
    results = await asyncio.gather(*(check(timeout_s) for check in checks.values()))
    return dict(zip(checks, results, strict=True))
