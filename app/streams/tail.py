"""One JetStream tail per thread per pod, fanned out in-process to that thread's SSE clients.

A tail holds the events of the newest attempt it has seen (from that attempt's `run_started`);
clients read the shared log by stream sequence, so a client that stops reading costs nothing
but its place in the log.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any, Protocol

from .events import Event, sse_frame

logger = logging.getLogger(__name__)


class TailSource(Protocol):
    async def last_sequence(self, thread_id: str) -> int: ...
    async def ordered_subscribe(self, thread_id: str, start_seq: int, cb: Any) -> Any: ...


class ThreadTail:
    """The shared log of one thread's subject on this pod."""

    def __init__(self, thread_id: str) -> None:
        self.thread_id = thread_id
        self.log: list[Event] = []
        self.seqs: list[int] = []
        self.last_seq = 0
        self.caught_up = asyncio.Event()
        self._target_seq = 0
        self._waiters: dict[asyncio.Future[None], float] = {}  # waiter -> deadline
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.clients = 0
        self.sub: Any = None
        self.close_handle: asyncio.TimerHandle | None = None

    @property
    def head(self) -> Event | None:
        return self.log[0] if self.log else None

    def add(self, ev: Event) -> None:
        """Take one event from the consumer, in stream order."""
        if ev.seq <= self.last_seq:
            return  # redelivered after a consumer reset
        self.last_seq = ev.seq
        if not ev.frame:  # every client of the pod sends the same bytes
            ev.frame = sse_frame(ev)
        head = self.head
        if ev.type == "run_started":
            # A new attempt or run: what came before is dead or finished. Trim.
            self.log, self.seqs = [ev], [ev.seq]
        elif (
            head is None
            or (head.run_id, head.attempt) == (ev.run_id, ev.attempt)
            or (ev.type == "done" and ev.run_id == head.run_id)
        ):
            self.log.append(ev)
            self.seqs.append(ev.seq)
        elif head.run_id != ev.run_id or ev.attempt > head.attempt:
            # A later run or attempt whose start we did not see (a done without chunks).
            self.log, self.seqs = [ev], [ev.seq]
        # else: a straggler of an attempt already superseded; drop it.
        if self.last_seq >= self._target_seq:
            self.caught_up.set()
        self._wake(self._waiters)
        self._waiters = {}

    @staticmethod
    def _wake(waiters: dict[asyncio.Future[None], float]) -> None:
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def after(self, seq: int) -> list[Event]:
        """Events of the log with a sequence above `seq` (the whole log if `seq` is older)."""
        return self.log[bisect.bisect_right(self.seqs, seq) :]

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


TIMER_SLACK_S = 0.01  # deadlines this close together fire together


def stream_seq(msg: Any) -> int:
    """A delivery's stream sequence, read from its reply subject: nats-py's `msg.metadata`
    builds a frozen dataclass and a datetime per message for it.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>`;
    any other form (a server with domains) goes through nats-py's parser.
    """
    tokens: list[str] = msg.reply.split(".") if msg.reply else []
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5])
    return int(msg.metadata.sequence.stream)


class TailHub:
    """The pod's tails, by thread: created on the first attach, closed after the last leaves."""

    def __init__(self, source: TailSource, *, linger_s: float) -> None:
        self.source = source
        self.linger_s = linger_s
        self.tails: dict[str, ThreadTail] = {}
        self._starting: dict[str, asyncio.Task[ThreadTail]] = {}

    @property
    def attached(self) -> int:
        return sum(t.clients for t in self.tails.values())

    @contextlib.asynccontextmanager
    async def attach(self, thread_id: str) -> AsyncIterator[ThreadTail]:
        tail = await self._get(thread_id)
        tail.clients += 1
        if tail.close_handle is not None:
            tail.close_handle.cancel()
            tail.close_handle = None
        try:
            yield tail
        finally:
            tail.clients -= 1
            if tail.clients == 0:
                loop = asyncio.get_running_loop()
                tail.close_handle = loop.call_later(
                    self.linger_s, lambda: asyncio.ensure_future(self._close_idle(tail))
                )

    async def _get(self, thread_id: str) -> ThreadTail:
        tail = self.tails.get(thread_id)
        if tail is not None:
            return tail
        task = self._starting.get(thread_id)
        if task is None:
            task = asyncio.ensure_future(self._start(thread_id))
            self._starting[thread_id] = task
            task.add_done_callback(lambda _: self._starting.pop(thread_id, None))
        return await asyncio.shield(task)

    async def _start(self, thread_id: str) -> ThreadTail:
        tail = ThreadTail(thread_id)
        tail._target_seq = await self.source.last_sequence(thread_id)
        if tail._target_seq == 0:
            tail.caught_up.set()
        tail.sub = await self._subscribe(tail)
        self.tails[thread_id] = tail
        return tail

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
            await tail.sub.unsubscribe()

    async def close(self) -> None:
        for tail in list(self.tails.values()):
            if tail.close_handle is not None:
                tail.close_handle.cancel()
            tail.close()
            with contextlib.suppress(Exception):
                await tail.sub.unsubscribe()
        self.tails.clear()
