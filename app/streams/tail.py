"""One JetStream tail per thread per pod: a cache of the thread's replies, shared by its clients.

A tail folds its subject's events into one `Reply` per run (streams/reply.py) and wakes the
pod's clients of the thread when anything arrives. It only makes serving fast: a client's
place is a part index (streams/position.py), and any part the tail does not hold is read from
JetStream or from the stored reply (streams/relay.py). So the tail may drop what it likes: it
holds at most about `max_bytes` (THREADGATE_TAIL_MAX_BYTES), dropping an earlier run first,
then the oldest parts of the current one.

The runs of a thread are ordered (`run_started.run_seq`): an event of a run older than the
tail's current one never begins a new run here (a stale `done`, a straggler of a fenced
process), it only reaches that run's own fold if the tail still has it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from typing import Any

from .events import Event, part_frame
from .reply import Reply

logger = logging.getLogger(__name__)

TIMER_SLACK_S = 0.01  # deadlines this close together fire together
# What a part held in memory costs besides its SSE frame (measured with tracemalloc): the
# Event, its strings (a chunk's text is in the frame too), its place in the list.
EVENT_OVERHEAD = 440
KEEP_RUNS = 2  # the current run and the one before it (its slow clients finish from memory)
KEEP_ENDED = 64


class ThreadTail:
    """The replies of one thread's subject on this pod, as far as memory allows."""

    def __init__(self, thread_id: str, *, max_bytes: int = 0) -> None:
        self.thread_id = thread_id
        self.runs: OrderedDict[str, Reply] = OrderedDict()  # oldest first
        self.run_seqs: dict[str, int] = {}  # a run's place among the thread's runs, if known
        self.current: Reply | None = None  # the newest run that began here
        # `done` of runs that never began here (stopped while queued, ended elsewhere): the
        # relay of such a run looks for its end at once instead of at its next check.
        self.ended: OrderedDict[str, Event] = OrderedDict()
        self.last_seq = 0
        self.max_bytes = max_bytes  # 0: unbounded
        self.held_bytes = 0
        self.caught_up = asyncio.Event()  # the subject's events at start have arrived
        self._target_seq = 0
        self._waiters: dict[asyncio.Future[None], float] = {}  # waiter -> deadline
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.clients = 0
        self.owner: str | None = None  # the principal that last attached (lingering bound)
        self.sub: Any = None
        self.close_handle: asyncio.TimerHandle | None = None
        self.started: asyncio.Future[None] | None = None  # set once subscribed
        self.last_event_at = 0.0  # loop time of the newest event
        # (run_id, attempt, executor) while the current run's executor is known to be gone
        self.stalled: tuple[str, int, str] | None = None

    def view(self, run_id: str) -> Reply | None:
        return self.runs.get(run_id)

    def later_than(self, run_seq: int) -> bool:
        """The tail's current run comes after the run with `run_seq` (that run has ended)."""
        current = self.current
        if current is None:
            return False
        seq = self.run_seqs.get(current.run_id)
        return seq is not None and seq > run_seq

    @property
    def in_flight(self) -> Event | None:
        """The current run's newest `run_started` when it has not said `done`."""
        current = self.current
        if current is None or current.done is not None:
            return None
        return current.started

    def add(self, ev: Event) -> None:
        """Take one event from the consumer, in stream order."""
        if ev.seq <= self.last_seq:
            return  # redelivered after a consumer reset
        self.last_seq = ev.seq
        view = self.runs.get(ev.run_id)
        if view is None and ev.type == "run_started" and self._begins(ev):
            view = self._open(ev)
        elif view is None and ev.type == "done":
            self.ended[ev.run_id] = ev
            while len(self.ended) > KEEP_ENDED:
                self.ended.popitem(last=False)
        if view is not None:
            if ev.part:
                part_frame(ev)  # made once here, shared by every client of the pod
            held = len(view.parts)
            if view.apply(ev):
                if len(view.parts) > held:
                    self.held_bytes += _cost(ev)
                elif len(view.parts) < held:
                    self._recount()
                if ev.type == "run_started" and view is self.current:
                    self.stalled = None
            if self.max_bytes and self.held_bytes > self.max_bytes:
                self._trim()
        self.last_event_at = asyncio.get_running_loop().time()
        if self.last_seq >= self._target_seq:
            self.caught_up.set()
        self.wake()

    def _begins(self, ev: Event) -> bool:
        """Whether a run_started of a run not held here makes it the current run: not when an
        older run's (by run_seq) comes after a newer one's."""
        if ev.run_seq is not None:
            self.run_seqs[ev.run_id] = ev.run_seq
        current = self.current
        if current is None or ev.run_seq is None:
            return True
        seq = self.run_seqs.get(current.run_id)
        return seq is None or ev.run_seq > seq

    def _open(self, ev: Event) -> Reply:
        view = Reply(ev.run_id)
        self.runs[ev.run_id] = view
        self.current = view
        while len(self.runs) > KEEP_RUNS:
            self._forget_run(next(iter(self.runs)))
        return view

    def _forget_run(self, run_id: str) -> None:
        view = self.runs.pop(run_id)
        self.held_bytes -= sum(_cost(p) for p in view.parts)
        self.run_seqs.pop(run_id, None)

    def _recount(self) -> None:
        self.held_bytes = sum(_cost(p) for v in self.runs.values() for p in v.parts)

    def _trim(self) -> None:
        """Over `max_bytes`: drop earlier runs, then the current run's oldest parts down to
        three quarters of the bound (in one go: a list's front is costly to cut part by
        part), never its newest part."""
        target = self.max_bytes * 3 // 4
        for run_id in list(self.runs):
            if self.held_bytes <= target or self.runs[run_id] is self.current:
                break
            self._forget_run(run_id)
        current = self.current
        if current is None or self.held_bytes <= target:
            return
        freed, n = 0, 0
        while n < len(current.parts) - 1 and self.held_bytes - freed > target:
            freed += _cost(current.parts[n])
            n += 1
        current.forget(current.first + n)
        self.held_bytes -= freed

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, {}
        self._wake(waiters)

    @staticmethod
    def _wake(waiters: dict[asyncio.Future[None], float]) -> None:
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait(self, seen_seq: int, timeout: float) -> None:
        """Return as soon as an event came after `seen_seq`, the tail's `last_seq` when the
        caller last looked (at once if one already has), or after about `timeout`.

        Every waiter is a bare future in one dict; one timer per tail serves all deadlines. With
        a thousand clients a future + timer + done-callback per waiter and per wake cost more
        than the relaying itself.
        """
        if self.last_seq != seen_seq:
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        deadline = loop.time() + timeout
        self._waiters[fut] = deadline
        if deadline < self._timer_at:
            self._arm(deadline)
        try:
            await fut
        finally:
            self._waiters.pop(fut, None)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_at(at, self._expire)

    def _expire(self) -> None:
        """Wake the waiters whose deadline has come (within a tick), re-arm for the rest."""
        self._timer, self._timer_at = None, math.inf
        due = asyncio.get_running_loop().time() + TIMER_SLACK_S
        expired = {f: at for f, at in self._waiters.items() if at <= due}
        for fut in expired:
            del self._waiters[fut]
        self._wake(expired)
        if self._waiters:
            self._arm(min(self._waiters.values()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _cost(ev: Event) -> int:
    return len(ev.frame) + EVENT_OVERHEAD
