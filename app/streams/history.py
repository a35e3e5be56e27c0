"""Reading a thread's subject again from a sequence on: what a tail dropped from memory."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .events import Event

PAGE = 512  # events per page (about 64 KiB of chunks: one write to a client)
FETCH_S = 1.0  # a page that does not come in this long: nothing more on the subject now
INACTIVE_S = 60.0  # the server deletes a consumer left behind (its pod died mid-read)


async def read_after(
    js: JetStreamContext, stream: str, subject: str, after_seq: int, page: int = PAGE
) -> AsyncGenerator[list[Event], None]:
    """A subject's events after `after_seq`, in stream order, a page at a time, until the
    subject has nothing more now (or the reader stops).

    A pull consumer of its own, paced by the reader: a push consumer per client is the fan-out
    trap of docs/DESIGN.md. It is deleted when the reader is done with it. An error (NATS
    away) reaches the reader, which treats the events as lost (streams/relay.py).
    """
    from .buffer import stream_seq

    name = f"history-{uuid.uuid4().hex}"
    config = ConsumerConfig(
        name=name,
        filter_subject=subject,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=after_seq + 1,
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
    try:
        while True:
            try:
                msgs = await sub.fetch(page, timeout=FETCH_S)
            except NatsTimeout:
                return
            events: list[Event] = []
            for msg in msgs:
                with contextlib.suppress(Exception):  # not ours: no part of any reply
                    events.append(Event.from_bytes(msg.data, seq=stream_seq(msg)))
            yield events
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, name)
