"""Publishing one attempt's events to JetStream: in order, pipelined, deduplicated, coalesced.

One wildcard inbox per connection receives the acks of every publisher (`Acks`), instead of
nats-py's `publish_async`, which makes an asyncio.Future, a NUID token, a done-callback and a
semaphore round per message. A publisher keeps its messages in flight in order and reads
their acks from plain slots; it waits (on one future) only when it must settle a message
whose ack has not come.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

from ..errors import StreamUnavailable
from ..ids import message_id
from ..settings import Settings
from .events import Event

logger = logging.getLogger(__name__)


class AttemptBroken(Exception):
    """The attempt's events can no longer be published in order; start a new attempt."""


@dataclass(slots=True)
class Ack:
    seq: int
    duplicate: bool = False


@dataclass(slots=True)
class _Slot:
    """One message in flight: what to send again, and its ack (or why it failed) once known."""

    n: int
    data: bytes
    msg_id: str
    sent_at: float
    ack: Ack | None = None
    error: Exception | None = None


class Acks:
    """The acks of every publisher on one connection, through one subscription to
    `<inbox>.<publisher>.<n>`. Publishers are held weakly: one that is dropped (its attempt
    ended) simply stops hearing acks."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = ""
        self.sub: Any = None
        self.publishers: weakref.WeakValueDictionary[int, JetStreamPublisher] = (
            weakref.WeakValueDictionary()
        )
        self._ids = itertools.count(1)

    async def start(self) -> None:
        if self.sub is None:
            self.prefix = f"{self.nc.new_inbox()}."
            self.sub = await self.nc.subscribe(f"{self.prefix}>", cb=self._on_ack)
            direct(self.sub, self._on_ack_now)

    def register(self, publisher: JetStreamPublisher) -> int:
        pid = next(self._ids)
        self.publishers[pid] = publisher
        return pid

    async def _on_ack(self, msg: Any) -> None:
        self._on_ack_now(msg)

    def _on_ack_now(self, msg: Any) -> None:
        pid, _, n = msg.subject[len(self.prefix) :].partition(".")
        publisher = self.publishers.get(int(pid))
        if publisher is not None:
            publisher._acked(int(n), _parse_ack(msg))


def _parse_ack(msg: Any) -> Ack | Exception:
    if msg.headers and msg.headers.get("Status") == "503":
        return NoStreamResponseError()  # no stream leader: nobody to store it (an election)
    try:
        body = orjson.loads(msg.data)
        if "error" in body:
            error: Exception = APIError.from_error(body["error"])
            return error
        return Ack(int(body["seq"]), body.get("duplicate") is True)
    except Exception as exc:  # not an ack: treated as a missing one
        return exc


def publish_now(nc: NATS, subject: str, reply: str, msg_id: str, payload: bytes) -> bool:
    """A JetStream publish with its message id, straight into nats-py's outgoing buffer: the
    HPUB that `Client.publish` writes, without awaiting two coroutines, a future and a queue
    put per message (nats-py 2.x: `_pending`, `_pending_data_size`, `_flush_queue`, which its
    flusher task writes out; tests/unit/test_publisher_fast.py checks them). Our subjects and
    ids hold no whitespace (thread ids are checked, ids are ours). False, and nothing sent,
    when this cannot be done here (not connected, the buffer full, a payload too large):
    `Client.publish` then does it, or raises."""
    c: Any = nc
    flush = getattr(c, "_flush_queue", None)
    if flush is None or not nc.is_connected or len(payload) > c._max_payload:
        return False
    head = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % msg_id.encode()
    cmd = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(head),
        len(head) + len(payload),
        head,
        payload,
    )
    if c._max_pending_size > 0 and c._pending_data_size + len(cmd) > c._max_pending_size:
        return False
    c._pending.append(cmd)
    c._pending_data_size += len(cmd)
    stats = c.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += len(payload)
    if flush.empty():  # as Client._send_publish does: one wake-up of the flusher at a time
        flush.put_nowait(asyncio.get_running_loop().create_future())
    return True


class _Direct(asyncio.Queue[Any]):
    """Stands in for a nats-py subscription's pending queue: a message is handled as nats-py
    hands it over, on its read loop, instead of being queued for the subscription's task (a
    queue put and get and a task switch per ack; acks were a quarter of a chunk's cost)."""

    def __init__(self, sub: Any, handle: Callable[[Any], None]) -> None:
        super().__init__()
        self.sub = sub
        self.handle = handle

    def put_nowait(self, msg: Any) -> None:
        self.sub._pending_size -= len(msg.data)  # nats-py counts it in before handing over
        try:
            self.handle(msg)
        except Exception:
            logger.exception("handling an ack failed")


def direct(sub: Any, handle: Callable[[Any], None]) -> bool:
    """Deliver `sub`'s messages to `handle` from nats-py's read loop (nats-py 2.x keeps a
    subscription's undelivered messages in `Subscription._pending_queue`, filled by
    `Client._process_msg` with put_nowait: tests/unit/test_publisher_fast.py checks it). False,
    and nothing changed, where that is not so: the subscription's callback is used then."""
    queue = getattr(sub, "_pending_queue", None)
    if not isinstance(queue, asyncio.Queue) or not hasattr(sub, "_pending_size"):
        return False
    sub._pending_queue = _Direct(sub, handle)
    return True


class JetStreamPublisher:
    """Publishes one attempt's events in order with up to `publish_window` acks in flight.

    The connection keeps our order; acks are settled in order. A message whose ack does not
    come (or says it was not stored) is published again with the same id, so JetStream drops
    it if it was stored, and so is every message after it. When a stream leader dies with
    publishes in flight, the next leader may store later messages before the lost ones come
    again: their acks then show a sequence below the last one settled. Such a message is
    published once more, under a new id, so that it is stored after its predecessors; readers
    take a part only when it is the next index, so its first copy is skipped as the far side
    of a gap. The attempt goes on.

    Coalescing (`part`): a text chunk that comes while this attempt's newest message still
    awaits its ack is held; chunks after it are merged into it (one part, one index, one
    message id) until that ack comes, `coalesce_ms` passes or it holds `coalesce_bytes`. An
    idle pod acks in well under a millisecond, long before a model's next delta: nothing is
    held then. A loaded pod sends fewer, larger messages, and every reader does less per delta.
    """

    def __init__(
        self,
        settings: Settings,
        nc: NATS,
        js: JetStreamContext,
        acks: Acks,
        subject: str,
        run_id: str,
        attempt: int,
        on_republish: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.acks = acks
        self.subject = subject
        self.run_id = run_id
        self.attempt = attempt
        self.on_republish = on_republish
        self.pid = acks.register(self)
        self.reply_prefix = f"{acks.prefix}{self.pid}."
        self.last_seq = 0
        self.sent = 0  # number of the newest message sent
        self.inflight: deque[_Slot] = deque()
        self.repairs = 0  # messages stored again after their predecessors
        self.held: Event | None = None  # a chunk not sent yet, growing by merged deltas
        self._held_part: int = 0
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_for = 0
        self._settling = False  # republishing one by one: nothing else goes out meanwhile
        self._late: asyncio.Task[None] | None = None  # a held chunk sent by its deadline

    # -- the attempt's side

    async def publish(self, event: Event, part: str | int) -> None:
        """A marker (`run_started`, `done`) or any event that is never held back."""
        await self._send_held()
        await self._send(event, part)

    def merge(self, text: str) -> bool:
        """Append a text delta to the chunk held back, if there is one and it has room: the
        common case under load, without an event or a coroutine per delta."""
        held = self.held
        if held is None or held.type != "chunk":
            return False
        if len(held.text or "") + len(text) > self.settings.coalesce_bytes:
            return False
        held.text = (held.text or "") + text
        return True

    async def part(self, event: Event) -> bool:
        """A part of the reply. True when it was merged into the chunk held before it (it
        then has that chunk's index: the caller does not count it as a new part)."""
        s = self.settings
        if self.held is not None:
            if event.type == "chunk" and self.merge(event.text or ""):
                return True
            await self._send_held()
        if event.type == "chunk" and s.coalesce_ms > 0 and self._busy():
            self.held, self._held_part = event, event.index or 0
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(s.coalesce_ms / 1000, self._held_too_long)
            return False
        await self._send(event, event.index or 0)
        return False

    async def flush(self) -> None:
        """Send what is held, then wait until every message is acknowledged in order."""
        await self._send_held()
        while self.inflight:
            await self._settle_oldest()

    # -- sending

    def _busy(self) -> bool:
        """The newest message sent still awaits its ack."""
        return bool(self.inflight) and self.inflight[-1].ack is None

    async def _send_held(self) -> None:
        """Send the held chunk (from the attempt's own coroutine: it may settle and wait)."""
        held = self.held
        if held is None or self._settling:
            return
        self.held = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._send(held, self._held_part)

    async def _send_held_aside(self) -> None:
        """Send the held chunk from an ack or a timer, beside the attempt's coroutine: only
        when that needs no settling (a window to wait on, an outage, a republish), which is
        the attempt's to do; else it goes with the attempt's next part or flush."""
        self._drain_acked()
        if (
            self.held is not None
            and not self._settling
            and self.nc.is_connected
            and len(self.inflight) < self.settings.publish_window
        ):
            try:
                await self._send_held()
            except Exception:
                logger.exception("sending a held chunk failed", extra=self._log())

    def _held_too_long(self) -> None:
        self._timer = None
        if self.held is not None and (self._late is None or self._late.done()):
            self._late = asyncio.ensure_future(self._send_held_aside())

    async def _send(self, event: Event, part: str | int) -> None:
        data = event.to_bytes()
        msg_id = message_id(self.run_id, self.attempt, part)
        self._drain_acked()
        while len(self.inflight) >= self.settings.publish_window:
            await self._settle_oldest()
        if not self.nc.is_connected or self._settling:
            # During an outage queue nothing more in the client: settle and go one by one.
            while self.inflight:
                await self._settle_oldest()
            await self._store_in_order(data, msg_id)
            return
        self.sent += 1
        slot = _Slot(self.sent, data, msg_id, asyncio.get_running_loop().time())
        self.inflight.append(slot)
        reply = f"{self.reply_prefix}{slot.n}"
        try:
            if not publish_now(self.nc, self.subject, reply, msg_id, data):
                await self.nc.publish(
                    self.subject, data, reply=reply, headers={"Nats-Msg-Id": msg_id}
                )
        except Exception as exc:
            slot.error = exc  # settled as a missing ack: published again

    # -- acks

    def _acked(self, n: int, result: Ack | Exception) -> None:
        """An ack (or why there is none), on nats-py's read loop: nothing here may wait."""
        inflight = self.inflight
        if not inflight:
            return
        i = n - inflight[0].n
        if not 0 <= i < len(inflight):
            return  # already settled (or republished one by one meanwhile)
        slot = inflight[i]
        if type(result) is Ack:
            slot.ack = result
        else:
            slot.error = result  # type: ignore[assignment]
        waiter = self._waiter
        if waiter is not None and n == self._waiting_for and not waiter.done():
            waiter.set_result(None)
        if n == self.sent and self.held is not None and (self._late is None or self._late.done()):
            # The ack it waited for: the held chunk goes (from a task: sending may wait).
            self._late = asyncio.ensure_future(self._send_held_aside())

    def _drain_acked(self) -> None:
        """Settle, without waiting, the oldest messages whose acks came in order."""
        inflight = self.inflight
        while inflight and inflight[0].ack is not None and inflight[0].ack.seq > self.last_seq:
            self.last_seq = inflight.popleft().ack.seq  # type: ignore[union-attr]

    async def _settle_oldest(self) -> None:
        self._drain_acked()
        if not self.inflight:
            return
        slot = self.inflight[0]
        if slot.ack is None and slot.error is None:
            loop = asyncio.get_running_loop()
            remaining = slot.sent_at + self.settings.publish_timeout_s - loop.time()
            if remaining > 0:
                self._waiter, self._waiting_for = loop.create_future(), slot.n
                try:
                    await asyncio.wait_for(self._waiter, remaining)
                except TimeoutError:
                    pass
                finally:
                    self._waiter = None
        self._drain_acked()
        if not self.inflight or self.inflight[0] is not slot:
            return  # settled meanwhile
        # No ack in time, an error, or stored before a predecessor: this message and every
        # one after it are published again, one by one, in order.
        why = repr(slot.error) if slot.error else "stored out of order" if slot.ack else "timeout"
        logger.warning("publish ack missing, republishing", extra={**self._log(), "error": why})
        pending = list(self.inflight)
        self.inflight.clear()
        if self.on_republish is not None:
            self.on_republish(len(pending))
        self._settling = True
        try:
            for s in pending:
                await self._store_in_order(s.data, s.msg_id)
        finally:
            self._settling = False

    async def _store_in_order(self, data: bytes, msg_id: str) -> None:
        """Publish and wait for the ack; store the message again if it landed before its
        predecessors (see the class docstring)."""
        ack = await self._publish_sync(data, msg_id)
        while ack.seq <= self.last_seq:
            self.repairs += 1
            logger.warning(
                "message %s stored out of order (seq %d after %d): publishing it again",
                msg_id,
                ack.seq,
                self.last_seq,
                extra=self._log(),
            )
            msg_id = f"{msg_id}:r{self.repairs}"  # the old id is a duplicate now
            ack = await self._publish_sync(data, msg_id)
        self.last_seq = ack.seq

    async def _publish_sync(self, data: bytes, msg_id: str) -> Any:
        cb = self.on_republish
        return await with_retry(
            lambda: self.js.publish(self.subject, data, headers={"Nats-Msg-Id": msg_id}),
            self.settings.nats_outage_limit_s,
            "publish",
            on_retry=(lambda: cb(1)) if cb is not None else None,
        )

    def _log(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "attempt": self.attempt}


async def with_retry(
    op: Callable[[], Awaitable[Any]],
    limit_s: float,
    what: str,
    on_retry: Callable[[], None] | None = None,
    retry_if: Callable[[Exception], bool] = lambda exc: True,
) -> Any:
    """Retry with exponential backoff (0.1 s → 0.5 s) until `limit_s` has passed (errors
    `retry_if` refuses are raised at once).

    A short cap: a stream leader election answers "no responders" at once for a few seconds,
    and a retry that comes a second late is a second the reply stands still.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    delay = 0.1
    while True:
        try:
            return await op()
        except Exception as exc:
            if not retry_if(exc):
                raise
            if loop.time() + delay > deadline:
                raise StreamUnavailable(
                    f"JetStream {what} failed for {limit_s:.0f}s: {exc!r}"
                ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            if on_retry is not None:
                on_retry()
