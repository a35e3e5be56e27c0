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
    """One attach read to the run's `done`: the reply, each part's index exactly the next."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    reply = Reply()
    held = None
    async with http.stream("GET", f"/threads/{thread}/attach", headers=headers) as resp:
        assert resp.status_code == 200
        async for ev in parse_sse(resp.aiter_lines()):
            if ev.event in ("chunk", "data"):
                if held is None:
                    held = ev.data["index"]
                assert ev.data["index"] == held, "a part twice, out of order, or skipped"
                held += 1
            reply.apply(ev)
            if ev.event == "done":
                break
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
        run = await pod.client.post(
            thread, "big", model_options={"chunks": CHUNKS, "delay_ms": 0.05}
        )
        live = asyncio.create_task(follow(http, thread))  # attached from the start
        # A late attacher while the run streams (issue 27 saw one get 6,143 of 20,000).
        while (await pod.client.run(thread, run["run_id"]))["status"] == "pending":  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # paces polling the run's status
        late = asyncio.create_task(follow(http, thread))
        reply, during = await live, await late
        assert reply.text == mock_reply(CHUNKS) and reply.duplicates == 0
        assert during.text == mock_reply(CHUNKS) and during.duplicates == 0
        tail = hub.tails[thread]
        assert tail.held_bytes <= BOUND, tail.held_bytes
        view = tail.view(run["run_id"])
        assert view is not None and view.first > 0  # the start left memory
        ids = [e.id for e in reply.events if e.id is not None]
        early, late_id = ids[100], ids[-5]

        # A late attacher, and clients resuming in the dropped part and in the held part.
        base = await consumers(pod)
        replies = await asyncio.gather(
            follow(http, thread), follow(http, thread, early), follow(http, thread, late_id)
        )
        whole, resumed_early, resumed_late = replies
        assert whole.text == mock_reply(CHUNKS) and whole.duplicates == 0
        for resumed, at in ((resumed_early, early), (resumed_late, late_id)):
            before = Reply()
            for ev in reply.events:
                before.apply(ev)
                if ev.id == at:
                    break
            for ev in resumed.events:
                before.apply(ev)
            assert before.text == mock_reply(CHUNKS) and before.duplicates == 0
        assert [e.event for e in resumed_late.events][-1] == "done"
        print(
            f"\n{CHUNKS}-chunk reply, tail bound {BOUND // 1024} KiB: tail held"
            f" {tail.held_bytes // 1024} KiB (parts {view.first}..{view.total - 1})"
        )
    # The consumers that read the dropped part are gone.
    async with asyncio.timeout(30):
        while await consumers(pod) > base:  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.05)  # paces polling the stream's consumer count
