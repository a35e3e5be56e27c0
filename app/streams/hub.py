"""The pod's tails, one per attached thread: started on the first attach, closed after the last
client leaves, bounded per principal, told when a run's executor is gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from .buffer import stream_seq
from .events import Event
from .tail import ThreadTail

logger = logging.getLogger(__name__)

STALL_CHECK_S = 1.0  # a tail silent this long mid-run asks whether the run's executor lives


class TailSource(Protocol):
    async def last_sequence(self, thread_id: str) -> int: ...
    async def ordered_subscribe(self, thread_id: str, start_seq: int, cb: Any) -> Any: ...
    async def close_subscription(self, sub: Any) -> None: ...


Liveness = Callable[[list[str]], Awaitable[set[str]]]  # executors -> those alive


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
