"""The JetStream publisher on a real nats-server: order, dedup ids, and coalescing's bounds.

A delta is held only while the attempt's newest message awaits its ack; what the stream then
holds must read back, through the readers' fold, as exactly the text that was published.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.js.errors import NotFoundError
from threadgate.settings import Settings, load_settings
from threadgate.streams.buffer import JetStreamBuffer, connect_nats, nats_servers
from threadgate.streams.events import chunk, data, run_started
from threadgate.streams.reply import fold

from tests.conftest import Stack, unique

pytestmark = pytest.mark.integration

RUN = "00000000-0000-4000-8000-000000000001"


@pytest.fixture
async def buffer(stack: Stack) -> AsyncIterator[JetStreamBuffer]:
    tag = unique("p")[2:]
    settings = load_settings(
        pod_name="pub-test",
        nats_url=stack.nats.url,
        stream_name=f"PUB_{tag}",
        subject_prefix=f"pub{tag}",
        coalesce_ms=200,
        coalesce_bytes=1000,
    )
    nc = await connect_nats(settings, "publisher-test")
    buf = JetStreamBuffer(settings, nc)
    await buf.ensure_stream()
    try:
        yield buf
    finally:
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(settings.stream_name)
        await nc.close()


def texts(n: int) -> list[str]:
    return [f"d{i} " for i in range(n)]


async def publish_reply(buffer: JetStreamBuffer, deltas: list[str], *, wait: bool) -> list[str]:
    """Publish `deltas` as one attempt's parts (`wait`: each delta after the last ack, as on
    an idle pod); the texts of the parts the caller kept (the publisher's merges included)."""
    pub = buffer.publisher("t", RUN, 1)
    await pub.publish(run_started(RUN, 1), "start")
    kept = []
    index = 0
    for text in deltas:
        if wait:
            await pub.flush()  # every ack in: nothing is in flight
        ev = chunk(RUN, 1, index, text)
        if not await pub.part(ev):
            kept.append(ev)
            index += 1
    await pub.flush()
    return [ev.text or "" for ev in kept]


async def test_an_idle_publisher_holds_nothing(buffer: JetStreamBuffer) -> None:
    deltas = texts(30)
    kept = await publish_reply(buffer, deltas, wait=True)
    assert kept == deltas  # one part per delta
    parts = fold(RUN, await buffer.read_subject("t")).parts
    assert [p.text for p in parts] == deltas


async def test_deltas_sent_while_acks_are_out_merge_in_order_within_the_bounds(
    buffer: JetStreamBuffer,
) -> None:
    deltas = texts(3000)
    kept = await publish_reply(buffer, deltas, wait=False)
    assert "".join(kept) == "".join(deltas)
    assert len(kept) < len(deltas)  # merged: a tight loop outruns every ack
    parts = fold(RUN, await buffer.read_subject("t")).parts
    assert [p.text for p in parts] == kept  # what the caller kept is what readers fold
    assert [p.index for p in parts] == list(range(len(kept)))
    assert max(len(p.text or "") for p in parts) <= buffer.settings.coalesce_bytes


async def test_a_data_event_is_never_merged_and_keeps_its_place(buffer: JetStreamBuffer) -> None:
    pub = buffer.publisher("t", RUN, 1)
    await pub.publish(run_started(RUN, 1), "start")
    order: list[str] = []
    index = 0
    for i in range(200):
        ev = data(RUN, 1, index, "tick", {"i": i}) if i % 50 == 49 else chunk(RUN, 1, index, "x")
        if not await pub.part(ev):
            order.append(ev.type)
            index += 1
    await pub.flush()
    parts = fold(RUN, await buffer.read_subject("t")).parts
    assert [p.type for p in parts] == order
    assert [p.data["i"] for p in parts if p.type == "data"] == [49, 99, 149, 199]
    assert "".join(p.text or "" for p in parts) == "x" * 196


def test_nats_url_lists_servers() -> None:
    assert nats_servers("nats://a:4222, nats://b:4222,") == ["nats://a:4222", "nats://b:4222"]
    settings: Settings = load_settings(nats_url="nats://a:4222,nats://b:4222")
    assert nats_servers(settings.nats_url) == ["nats://a:4222", "nats://b:4222"]
