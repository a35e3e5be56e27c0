"""Reading a thread's subject from JetStream, from a sequence on: what a tail does not hold.

A read goes up to the subject's newest event as it was when the read began ("nothing more
now"), never further: what comes later reaches the pod's tail. A page that is slow to come is
waited for — a timeout is never taken for the end of the subject — and only a read that makes
no progress for `patience_s` fails (StreamUnavailable: the reader tries again later).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from ..errors import StreamUnavailable
from .events import Event

PAGE = 512  # events per page (about 64 KiB of chunks)
FETCH_S = 1.0  # one wait for a page; the read goes on after it
PATIENCE_S = 30.0  # no progress for this long: JetStream is away
INACTIVE_S = 60.0  # the server deletes a consumer left behind (its pod died mid-read)


async def newest_seq(js: JetStreamContext, stream: str, subject: str) -> int:
    try:
        msg = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return 0
    return int(msg.seq or 0)


async def event_at(js: JetStreamContext, stream: str, subject: str, seq: int) -> Event | None:
    """The subject's event at stream sequence `seq`, None when it is not there (any more)."""
    try:
        msg = await js.get_msg(stream, seq)
    except NotFoundError:
        return None
    if msg.subject != subject or msg.data is None:
        return None
    try:
        return Event.from_bytes(msg.data, seq=seq)
    except Exception:
        return None


async def read_after(
    js: JetStreamContext,
    stream: str,
    subject: str,
    after_seq: int,
    *,
    page: int = PAGE,
    patience_s: float = PATIENCE_S,
) -> AsyncGenerator[list[Event], None]:
    """The subject's events after `after_seq` (0: from its first), in stream order, a page at
    a time, up to its newest event now.

    A pull consumer of its own, paced by the reader: a push consumer per client is the fan-out
    trap of docs/DESIGN.md. It is deleted when the reader is done with it.
    """
    from .buffer import stream_seq

    target = await newest_seq(js, stream, subject)
    if target <= after_seq:
        return
    name = f"history-{uuid.uuid4().hex}"
    config = ConsumerConfig(
        name=name,
        filter_subject=subject,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if after_seq else DeliverPolicy.ALL,
        opt_start_seq=after_seq + 1 if after_seq else None,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=INACTIVE_S,
    )
    await js.add_consumer(stream, config)
    try:
        sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
    except BaseException:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
        raise
    at, waited = after_seq, 0.0
    try:
        while at < target:
            try:
                msgs = await sub.fetch(min(page, 4096), timeout=FETCH_S)
            except NatsTimeout:
                # Slow, or the rest was purged meanwhile (the subject's newest says which).
                newest = await newest_seq(js, stream, subject)
                if newest <= at:
                    return
                waited += FETCH_S
                if waited >= patience_s:
                    raise StreamUnavailable(f"reading {subject}: no progress") from None
                continue
            waited = 0.0
            events: list[Event] = []
            for msg in msgs:
                at = max(at, stream_seq(msg))
                with contextlib.suppress(Exception):  # not ours: no part of any reply
                    events.append(Event.from_bytes(msg.data, seq=stream_seq(msg)))
            yield events
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
