"""Stop signals for runs executing on this pod (cancel, interrupt, a newer attempt elsewhere).

DBOS cancel does not stop a running step, so stopping is ours: the flag in PostgreSQL is the
truth (a run reads it when an attempt begins, and polls it while it runs), the NATS control
message is the fast path. Only runs this pod executes are kept: every pod hears every stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

# A stop reason that arrives on the control subject must be one of these: it becomes the
# run's final status. `superseded` is local only: another process began a newer attempt.
STOP_REASONS = frozenset({"cancelled", "interrupted"})


@dataclass(slots=True)
class Watch:
    """One executing run: why it should stop, and the task to wake while it waits on its
    source (a stalled model must not delay a cancel until its own timeout)."""

    reason: str | None = None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: asyncio.Task[object] | None = None  # the attempt, while it awaits its source
    woke: bool = False  # we cancelled `waiting` to deliver the stop
    superseded: bool = False  # another process began a newer attempt: stop, record nothing


class StopSignals:
    def __init__(self) -> None:
        self._runs: dict[str, Watch] = {}

    def watch(self, run_id: str) -> Watch:
        """This pod executes the run from now on: keep its stops."""
        return self._runs.setdefault(run_id, Watch())

    def forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def __len__(self) -> int:
        return len(self._runs)

    def request(self, run_id: str, reason: str) -> None:
        w = self._runs.get(run_id)
        if w is None:
            return  # not executing here: its attempt reads the flag from PostgreSQL
        if w.reason is None:
            w.reason = reason
        w.event.set()
        if w.waiting is not None and not w.woke:
            w.woke = True
            w.waiting.cancel()

    def reason(self, run_id: str) -> str | None:
        w = self._runs.get(run_id)
        return w.reason if w is not None else None

    async def wait(self, run_id: str, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as the run is asked to stop."""
        w = self.watch(run_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.event.wait(), seconds)
        return w.event.is_set()
