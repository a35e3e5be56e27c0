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
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from .buffer import stream_seq
from .events import Event, part_frame
from .reply import Reply

logger = logging.getLogger(__name__)

TIMER_SLACK_S = 0.01  # deadlines this close together fire together
# What a part held in memory costs besides its SSE frame (measured with tracemalloc): the
# Event, its strings (a chunk's text is in the frame too), its place in the list.
EVENT_OVERHEAD = 440
KEEP_RUNS = 2  # the current run and the one before it (its slow clients finish from memory)
STALL_CHECK_S = 1.0  # a tail silent this long mid-run asks whether the run's executor lives


class TailSource(Protocol):
    async def last_sequence(self, thread_id: str) -> int: ...
    async def ordered_subscribe(self, thread_id: str, start_seq: int, cb: Any) -> Any: ...
    async def close_subscription(self, sub: Any) -> None: ...


Liveness = Callable[[list[str]], Awaitable[set[str]]]  # executors -> those alive


class ThreadTail:
    """The replies of one thread's subject on this pod, as far as memory allows."""

    def __init__(self, thread_id: str, *, max_bytes: int = 0) -> None:
        self.thread_id = thread_id
        self.runs: OrderedDict[str, Reply] = OrderedDict()  # oldest first
        self.run_seqs: dict[str, int] = {}  # a run's place among the thread's runs, if known
        self.current: Reply | None = None  # the newest run that began here
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


class TailHub:
    """The pod's tails, by thread: started on the first attach, closed `linger_s` after the
    last client leaves, however it leaves (a client that hangs up mid-attach included). Each
    principal keeps at most `max_lingering` tails open that no client uses: past that, its
    oldest idle one closes at once (its JetStream consumer with it)."""

    def __init__(
        self,
        source: TailSource,
        *,
        linger_s: float,
        liveness: Liveness | None = None,
        max_bytes: int = 0,
        max_lingering: int = 50,
    ) -> None:
        self.source = source
        self.linger_s = linger_s
        self.liveness = liveness
        self.max_bytes = max_bytes  # per tail (THREADGATE_TAIL_MAX_BYTES); 0: unbounded
        self.max_lingering = max_lingering  # per principal
        self.tails: dict[str, ThreadTail] = {}
        self._lingering: dict[str, OrderedDict[str, ThreadTail]] = {}  # principal -> idle tails
        self._watchdog: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Future[None]] = set()

    @property
    def attached(self) -> int:
        return sum(t.clients for t in self.tails.values())

    @contextlib.asynccontextmanager
    async def attach(self, thread_id: str, principal: str = "") -> AsyncIterator[ThreadTail]:
        tail = await self.acquire(thread_id, principal)
        try:
            yield tail
        finally:
            self.release(tail)

    async def acquire(self, thread_id: str, principal: str = "") -> ThreadTail:
        """The thread's tail, started if need be, with this caller counted as a client. The
        caller is counted before anything is awaited: it is released if cancelled here."""
        tail = self.tails.get(thread_id)
        if tail is None:
            tail = ThreadTail(thread_id, max_bytes=self.max_bytes)
            self.tails[thread_id] = tail
            tail.started = asyncio.ensure_future(self._start(tail))
        self._unlinger(tail)
        tail.clients += 1
        tail.owner = principal
        try:
            assert tail.started is not None
            await asyncio.shield(tail.started)
        except BaseException:
            self.release(tail)
            raise
        return tail

    def release(self, tail: ThreadTail) -> None:
        tail.clients -= 1
        if tail.clients > 0 or self.tails.get(tail.thread_id) is not tail:
            return
        idle = self._lingering.setdefault(tail.owner or "", OrderedDict())
        idle[tail.thread_id] = tail
        tail.close_handle = asyncio.get_running_loop().call_later(
            self.linger_s, lambda: asyncio.ensure_future(self._close_idle(tail))
        )
        while len(idle) > self.max_lingering:
            _, oldest = idle.popitem(last=False)
            self._closing.add(asyncio.ensure_future(self._close_idle(oldest)))

    def _unlinger(self, tail: ThreadTail) -> None:
        if tail.close_handle is not None:
            tail.close_handle.cancel()
            tail.close_handle = None
        idle = self._lingering.get(tail.owner or "")
        if idle is not None:
            idle.pop(tail.thread_id, None)
            if not idle:
                del self._lingering[tail.owner or ""]

    @property
    def held_bytes(self) -> int:
        """What the tails hold, by the estimate that bounds each."""
        return sum(t.held_bytes for t in self.tails.values())

    async def _start(self, tail: ThreadTail) -> None:
        try:
            tail._target_seq = await self.source.last_sequence(tail.thread_id)
            if tail._target_seq == 0:
                tail.caught_up.set()
            tail.sub = await self._subscribe(tail)
        except BaseException:
            if self.tails.get(tail.thread_id) is tail:
                del self.tails[tail.thread_id]
            raise
        if self.liveness is not None and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch_stalls(), name="tail-watchdog")

    async def _subscribe(self, tail: ThreadTail) -> Any:
        """An ordered consumer from the tail's next sequence (everything, for a new tail)."""

        async def on_msg(msg: Any) -> None:
            try:
                ev = Event.from_bytes(msg.data, seq=stream_seq(msg))
            except Exception:
                logger.exception("undecodable event", extra={"thread_id": tail.thread_id})
                return
            tail.add(ev)

        start = tail.last_seq + 1 if tail.last_seq else 0
        return await self.source.ordered_subscribe(tail.thread_id, start, on_msg)

    async def _watch_stalls(self) -> None:
        """Mark tails whose run's executor died (its fencing claim is free) as stalled: their
        clients hear it at once instead of watching a silent stream until the replay."""
        while True:
            await asyncio.sleep(STALL_CHECK_S)
            # In a function of its own: its locals (a tail, a log) go when it returns, not
            # when the next tail comes (a closed tail's log stayed alive until then).
            await self._check_stalls()

    async def _check_stalls(self) -> None:
        assert self.liveness is not None
        now = asyncio.get_running_loop().time()
        silent: dict[str, list[tuple[ThreadTail, Event]]] = {}
        for tail in self.tails.values():
            started = tail.in_flight
            if (
                started is not None
                and started.executor
                and tail.stalled is None
                and now - tail.last_event_at >= STALL_CHECK_S
            ):
                silent.setdefault(started.executor, []).append((tail, started))
        if not silent:
            return
        try:
            alive = await self.liveness(sorted(silent))
        except Exception as exc:
            logger.debug("stall check failed: %r", exc)
            return
        for executor, tails in silent.items():
            if executor in alive:
                continue
            for tail, started in tails:
                if tail.in_flight is started:
                    tail.stalled = (started.run_id, started.attempt, executor)
                    tail.wake()

    async def resubscribe_all(self) -> None:
        """After NATS comes back its consumers may be gone: continue every tail where it was."""
        await asyncio.gather(*(self._resubscribe(t) for t in list(self.tails.values())))

    async def _resubscribe(self, tail: ThreadTail) -> None:
        delay = 1.0
        while self.tails.get(tail.thread_id) is tail:
            if tail.sub is not None:
                await self.source.close_subscription(tail.sub)
            try:
                tail.sub = await self._subscribe(tail)
                logger.info(
                    "tail resubscribed after seq %d",
                    tail.last_seq,
                    extra={"thread_id": tail.thread_id},
                )
                return
            except Exception as exc:
                logger.warning(
                    "tail resubscribe failed, retrying in %.0fs: %r",
                    delay,
                    exc,
                    extra={"thread_id": tail.thread_id},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _close_idle(self, tail: ThreadTail) -> None:
        self._closing = {f for f in self._closing if not f.done()}
        if tail.clients > 0 or self.tails.get(tail.thread_id) is not tail:
            return
        self._unlinger(tail)
        del self.tails[tail.thread_id]
        tail.close()
        with contextlib.suppress(Exception):
            if tail.started is not None and not tail.started.done():
                await tail.started
        if tail.sub is not None:
            await self.source.close_subscription(tail.sub)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for tail in list(self.tails.values()):
            if tail.close_handle is not None:
                tail.close_handle.cancel()
            tail.close()
            if tail.sub is not None:
                await self.source.close_subscription(tail.sub)
        self.tails.clear()
        self._lingering.clear()
