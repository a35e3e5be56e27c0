"""Stop signals for runs executing on this pod (cancel, interrupt, a newer attempt elsewhere).

DBOS cancel does not stop a running step, so stopping is ours: the flag in PostgreSQL is the
truth (a run reads it when an attempt begins, and the process polls the rows of all its
running runs in one query, `StopPoller`), the NATS control message is the fast path. Only runs
this pod executes are kept: every pod hears every stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
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
        self.poller: StopPoller | None = None  # the process's one poll of its runs' rows

    def watch(self, run_id: str) -> Watch:
        """This pod executes the run from now on: keep its stops."""
        return self._runs.setdefault(run_id, Watch())

    def polling(self, read: StateReader, every_s: float) -> StopPoller:
        """The process's stop poller (made at its first use)."""
        if self.poller is None:
            self.poller = StopPoller(read, every_s)
        return self.poller

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


# What the poller reads for the runs executing here: {run_id: (stop requested, newest attempt)}.
StateReader = Callable[[list[str]], Awaitable[dict[str, tuple[str | None, int]]]]
# Told each poll's answer for its run; returns False to stop being told.
StateHandler = Callable[[str | None, int], bool]


class StopPoller:
    """One read per process, every `every_s`, of the rows of all runs executing here: a stop
    whose control message was missed, or a newer attempt begun elsewhere. One query a second
    whatever the number of runs (it was one query and one pool check per run per second:
    6.6 % of a busy pod's loop, ~200 transactions/s at 100 chats)."""

    def __init__(self, read: StateReader, every_s: float) -> None:
        self.read = read
        self.every_s = every_s
        self._runs: dict[str, StateHandler] = {}
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def polled(self, run_id: str, handler: StateHandler) -> Iterator[None]:
        """While the block runs, `handler` hears each poll's answer for the run."""
        self._runs[run_id] = handler
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="stop-poll")
        try:
            yield
        finally:
            if self._runs.get(run_id) is handler:
                del self._runs[run_id]

    async def _poll(self) -> None:
        while self._runs:
            await asyncio.sleep(self.every_s)
            ids = list(self._runs)
            if not ids:
                return
            try:
                states = await self.read(ids)
            except Exception:
                continue  # the database is away: the runs go on, the next poll retries
            for run_id, (reason, newest) in states.items():
                handler = self._runs.get(run_id)
                if handler is not None and not handler(reason, newest):
                    del self._runs[run_id]

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
