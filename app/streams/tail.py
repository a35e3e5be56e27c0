"""One JetStream tail per thread per pod, fanned out in-process to that thread's SSE clients.

A tail keeps the subject's events since the last purge point (a run's first attempt, or an
attempt that regenerates the reply): a continued attempt appends to its run's segment. The
segment before it is kept too, so that a client slowed down by its socket still finds the end
of its run after the next run began. Clients read the shared log by stream sequence: a client
that stops reading costs nothing but its place in the log.

A tail holds at most about `max_bytes` (THREADGATE_TAIL_MAX_BYTES) of events: beyond it the
oldest are dropped, the previous segment's first. Events dropped from the current segment are
still in JetStream (they were not purged): a client that needs them reads them from there
(`history`), and the tail keeps where the reply stood after them (`spilled_*`), so a client
resuming after them needs nothing read.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from .buffer import stream_seq
from .events import Event, sse_frame

logger = logging.getLogger(__name__)

TIMER_SLACK_S = 0.01  # deadlines this close together fire together
# What an event held in the log costs besides its SSE frame (measured with tracemalloc: 568
# bytes per 100,000-chunk reply event, 128 of them the frame): the Event, its strings (a
# chunk's text is in the frame too), its sequence.
EVENT_OVERHEAD = 440
History = Callable[[int], AsyncGenerator[list[Event], None]]  # events after a seq, in pages
STALL_CHECK_S = 1.0  # a tail silent this long mid-run asks whether the run's executor lives


class TailSource(Protocol):
    async def last_sequence(self, thread_id: str) -> int: ...
    async def ordered_subscribe(self, thread_id: str, start_seq: int, cb: Any) -> Any: ...


Liveness = Callable[[list[str]], Awaitable[set[str]]]  # executors -> those alive


class ThreadTail:
    """The shared log of one thread's subject on this pod."""

    def __init__(
        self, thread_id: str, *, max_bytes: int = 0, history: History | None = None
    ) -> None:
        self.thread_id = thread_id
        self.log: list[Event] = []
        self.seqs: list[int] = []
        self.segment = 0  # index in `log` where the current segment begins
        self.last_seq = 0
        self.trimmed_seq = 0  # events up to this sequence are no longer held
        # Bounded memory (0: unbounded). Only with `history` does the current segment lose
        # events: its clients must be able to read them elsewhere.
        self.max_bytes = max_bytes
        self.history = history
        self.held_bytes = 0
        self._head: Event | None = None  # the current segment's first event, held or not
        self._started: Event | None = None  # its newest run_started
        self._done = False  # a `done` came after `_started`
        # The reply of the current segment's run after its events dropped from memory (up to
        # `trimmed_seq`): the newest attempt and how many parts (a relay Cursor's fields).
        self.spilled_attempt = 0
        self.spilled_parts = 0
        self.caught_up = asyncio.Event()
        self._target_seq = 0
        # The sequence of the newest event on the subject in JetStream (set by the hub).
        self.subject_last: Callable[[], Awaitable[int]] | None = None
        self._waiters: dict[asyncio.Future[None], float] = {}  # waiter -> deadline
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.clients = 0
        self.sub: Any = None
        self.close_handle: asyncio.TimerHandle | None = None
        self.started: asyncio.Future[None] | None = None  # set once subscribed
        self.last_event_at = 0.0  # loop time of the newest event
        # (run_id, attempt, executor) while the run's executor is known to be gone
        self.stalled: tuple[str, int, str] | None = None

    @property
    def head(self) -> Event | None:
        """The first event of the current segment (held in the log or not)."""
        return self._head

    @property
    def in_flight(self) -> Event | None:
        """The current segment's newest `run_started` when its run has not said `done`."""
        return None if self._done else self._started

    def add(self, ev: Event) -> None:
        """Take one event from the consumer, in stream order."""
        if ev.seq <= self.last_seq:
            return  # redelivered after a consumer reset
        self.last_seq = ev.seq
        if not ev.frame:  # every client of the pod sends the same bytes
            ev.frame = sse_frame(ev)
        head = self.head
        if (
            head is None
            or ev.run_id != head.run_id
            or (ev.type == "run_started" and ev.resume_from is None)
        ):
            self._new_segment()
            self._head = ev
        if ev.type == "run_started":
            self.stalled = None
            self._started, self._done = ev, False
        elif ev.type == "done":
            self._done = True
        self.log.append(ev)
        self.seqs.append(ev.seq)
        self.held_bytes += _cost(ev)
        if self.max_bytes and self.held_bytes > self.max_bytes:
            self._trim()
        self.last_event_at = asyncio.get_running_loop().time()
        if self.last_seq >= self._target_seq:
            self.caught_up.set()
        self.wake()

    def _new_segment(self) -> None:
        """A purge point: keep the segment that ends here, drop the one before it."""
        if self.segment:
            self._drop(self.segment)
        self.segment = len(self.log)
        self._head, self._started, self._done = None, None, False
        self.spilled_attempt = self.spilled_parts = 0

    def _drop(self, n: int) -> None:
        """Forget the log's `n` oldest events."""
        self.trimmed_seq = self.seqs[n - 1]
        self.held_bytes -= sum(_cost(ev) for ev in self.log[:n])
        del self.log[:n]
        del self.seqs[:n]
        self.segment = max(self.segment - n, 0)

    def _trim(self) -> None:
        """Over `max_bytes`: drop the oldest events down to three quarters of it (in one go:
        a list's front is costly to cut event by event). The previous segment goes first;
        the current one only when its events can be read again (`history`), and never its
        newest event."""
        target = self.max_bytes * 3 // 4
        limit = len(self.log) - 1 if self.history is not None else self.segment
        freed, n = 0, 0
        while n < limit and self.held_bytes - freed > target:
            freed += _cost(self.log[n])
            n += 1
        if not n:
            return
        head = self._head
        for ev in self.log[max(self.segment, 0) : n]:  # the current segment's, if any
            self._spill(ev, head)
        self._drop(n)

    def _spill(self, ev: Event, head: Event | None) -> None:
        """Fold an event of the current segment that leaves memory into `spilled_*`: the
        reply rules of streams/reply.py, counting parts instead of keeping them."""
        if head is None or ev.run_id != head.run_id or ev.attempt < self.spilled_attempt:
            return
        if ev.type == "run_started":
            self.spilled_attempt = ev.attempt
            k = ev.resume_from
            self.spilled_parts = 0 if k is None else min(self.spilled_parts, k)
        elif ev.part:
            self.spilled_attempt = ev.attempt
            if ev.index == self.spilled_parts:
                self.spilled_parts += 1

    def spilled(self, seq: int) -> bool:
        """Events after `seq` (a client's position) up to `trimmed_seq` left memory but are
        in JetStream: they are the current segment's (not purged), read with `history`."""
        head = self._head
        return (
            self.history is not None
            and head is not None
            and head.seq - 1 <= seq < self.trimmed_seq
            and self.trimmed_seq >= head.seq
        )

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, {}
        self._wake(waiters)

    @staticmethod
    def _wake(waiters: dict[asyncio.Future[None], float]) -> None:
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def after(self, seq: int) -> list[Event]:
        """Events of the log with a sequence above `seq`."""
        return self.log[bisect.bisect_right(self.seqs, seq) :]

    def upto(self, seq: int) -> list[Event]:
        """Events of the log with a sequence up to `seq`."""
        return self.log[: bisect.bisect_right(self.seqs, seq)]

    def missed(self, seq: int) -> bool:
        """A client that processed events up to `seq` lacks some the log no longer holds."""
        return seq < self.trimmed_seq

    def start_of(self, run_id: str) -> int:
        """Where a new client of `run_id` begins: before the newest segment that is that
        run's, else after everything held (the run has not streamed yet). Before the current
        segment's head even when it left memory: the client reads it from JetStream."""
        if self._head is not None and self._head.run_id == run_id:
            return self._head.seq - 1
        if self.log and self.log[0].run_id == run_id:
            return self.seqs[0] - 1
        return self.last_seq

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
    """The pod's tails, by thread: created on the first attach, closed `linger_s` after the
    last client leaves, however it leaves (a client that hangs up mid-attach included)."""

    def __init__(
        self,
        source: TailSource,
        *,
        linger_s: float,
        liveness: Liveness | None = None,
        max_bytes: int = 0,
    ) -> None:
        self.source = source
        self.linger_s = linger_s
        self.liveness = liveness
        self.max_bytes = max_bytes  # per tail (THREADGATE_TAIL_MAX_BYTES); 0: unbounded
        self.tails: dict[str, ThreadTail] = {}
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def attached(self) -> int:
        return sum(t.clients for t in self.tails.values())

    @contextlib.asynccontextmanager
    async def attach(self, thread_id: str) -> AsyncIterator[ThreadTail]:
        tail = await self.acquire(thread_id)
        try:
            yield tail
        finally:
            self.release(tail)

    async def acquire(self, thread_id: str) -> ThreadTail:
        """The thread's tail, started if need be, with this caller counted as a client. The
        caller is counted before anything is awaited: it is released if cancelled here."""
        tail = self.tails.get(thread_id)
        if tail is None:
            tail = ThreadTail(thread_id, max_bytes=self.max_bytes, history=self._history(thread_id))
            tail.subject_last = functools.partial(self.source.last_sequence, thread_id)
            self.tails[thread_id] = tail
            tail.started = asyncio.ensure_future(self._start(tail))
        tail.clients += 1
        if tail.close_handle is not None:
            tail.close_handle.cancel()
            tail.close_handle = None
        try:
            assert tail.started is not None
            await asyncio.shield(tail.started)
        except BaseException:
            self.release(tail)
            raise
        return tail

    def release(self, tail: ThreadTail) -> None:
        tail.clients -= 1
        if tail.clients == 0:
            loop = asyncio.get_running_loop()
            tail.close_handle = loop.call_later(
                self.linger_s, lambda: asyncio.ensure_future(self._close_idle(tail))
            )

    @property
    def held_bytes(self) -> int:
        """What the tails hold, by the estimate that bounds each."""
        return sum(t.held_bytes for t in self.tails.values())

    def _history(self, thread_id: str) -> History | None:
        """A thread's events after a sequence, from JetStream, when the source can read them."""
        read_after = getattr(self.source, "read_after", None)
        if read_after is None:
            return None

        def history(after_seq: int) -> AsyncGenerator[list[Event], None]:
            pages: AsyncGenerator[list[Event], None] = read_after(thread_id, after_seq)
            return pages

        return history

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
            with contextlib.suppress(Exception):
                await tail.sub.unsubscribe()
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
        if tail.clients > 0 or self.tails.get(tail.thread_id) is not tail:
            return
        del self.tails[tail.thread_id]
        tail.close()
        with contextlib.suppress(Exception):
            if tail.started is not None and not tail.started.done():
                await tail.started
        with contextlib.suppress(Exception):
            await tail.sub.unsubscribe()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for tail in list(self.tails.values()):
            if tail.close_handle is not None:
                tail.close_handle.cancel()
            tail.close()
            with contextlib.suppress(Exception):
                await tail.sub.unsubscribe()
        self.tails.clear()
