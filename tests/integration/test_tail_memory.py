"""A tail's memory is bounded (THREADGATE_TAIL_MAX_BYTES) with real JetStream: a reply far
larger than the bound is held within it, and every client — live, late, resuming in the part
that left memory or in the part still held — gets it whole, once, in order; the consumers that
read the dropped part back are deleted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from threadgate.client import Reply, parse_sse
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration

BOUND = 256 * 1024
CHUNKS = 20_000  # about 11 MB in a tail without a bound


@pytest.fixture
def bounded(pod: Pod) -> Iterator[None]:
    hub = pod.runtime.hub
    assert hub is not None
    before = hub.max_bytes
    hub.max_bytes = BOUND  # tails started from now on
    try:
        yield
    finally:
        hub.max_bytes = before


async def follow(http: httpx.AsyncClient, thread: str, last_event_id: str | None = None) -> Reply:
    """One attach read to the run's `done`: the reply, with the events' ids checked to rise."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    reply = Reply()
    ids: list[int] = []
    async with http.stream("GET", f"/threads/{thread}/attach", headers=headers) as resp:
        assert resp.status_code == 200
        async for ev in parse_sse(resp.aiter_lines()):
            reply.apply(ev)
            if ev.id is not None:
                ids.append(int(ev.id))
            if ev.event == "done":
                break
    assert ids == sorted(set(ids)), "an event twice, or out of order"
    return reply


async def consumers(pod: Pod) -> int:
    assert pod.runtime.buffer is not None
    info = await pod.runtime.buffer.js.stream_info(pod.settings.stream_name)
    return int(info.state.consumer_count)


async def test_a_reply_larger_than_the_bound_reaches_every_client_whole(
    pod: Pod, bounded: None
) -> None:
    hub = pod.runtime.hub
    assert hub is not None
    thread = unique("big")
    async with httpx.AsyncClient(base_url=pod.url, timeout=120) as http:
        await pod.client.post(thread, "big", model_options={"chunks": CHUNKS, "delay_ms": 0})
        live = asyncio.create_task(follow(http, thread))  # attached from the start
        reply = await live
        assert reply.text == mock_reply(CHUNKS) and reply.duplicates == 0
        tail = hub.tails[thread]
        assert tail.held_bytes <= BOUND, tail.held_bytes
        head = tail.head
        assert head is not None and tail.trimmed_seq > head.seq  # the start left memory
        ids = [int(e.id) for e in reply.events if e.id is not None]
        early = next(i for i in ids if i < tail.trimmed_seq and i > head.seq + 10)
        late = ids[-5]
        assert late > tail.trimmed_seq

        # A late attacher, and clients resuming in the dropped part and in the held part.
        base = await consumers(pod)
        replies = await asyncio.gather(
            follow(http, thread),
            follow(http, thread, str(early)),
            follow(http, thread, str(late)),
        )
        whole, resumed_early, resumed_late = replies
        assert whole.text == mock_reply(CHUNKS) and whole.duplicates == 0
        before = Reply()
        for ev in reply.events:
            if ev.id is not None and int(ev.id) > early:
                break
            before.apply(ev)
        for ev in resumed_early.events:
            before.apply(ev)
        assert before.text == mock_reply(CHUNKS) and before.duplicates == 0
        assert all(e.id is None or int(e.id) > late for e in resumed_late.events)
        assert [e.event for e in resumed_late.events][-1] == "done"
        print(
            f"\n{CHUNKS}-chunk reply, tail bound {BOUND // 1024} KiB: tail held"
            f" {tail.held_bytes // 1024} KiB ({len(tail.log)} events, the first"
            f" {tail.trimmed_seq - head.seq + 1} read back from JetStream by the clients that"
            " needed them)"
        )
    # The consumers that read the dropped part are gone.
    async with asyncio.timeout(30):
        while await consumers(pod) > base:  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.05)  # paces polling the stream's consumer count
