"""SIGKILL of the pod running a reply: the run continues where it stopped, every client ends
with exactly one copy of the stored reply.

Every reply here is the mock's `vary` reply (chunk i of attempt a reads `chunk-{i}.{a} `), so
any mix of two attempts, a duplicate or a gap shows in the text itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from threadgate.client import AsyncClient, Reply, SseEvent
from threadgate.models.mock import mock_reply
from threadgate.streams.position import Position, parse

from tests.conftest import unique
from tests.multipod.cluster import Attacher, Cluster, running_on, wait_run

pytestmark = pytest.mark.multipod

CHUNKS = 100
LONG = {"chunks": CHUNKS, "delay_ms": 50, "vary": True}  # 5 s of reply: time to kill it mid-way,
# even when the clients reach chunk 10 seconds late on a busy machine (2 s was not enough)


def continued(run: dict[str, Any]) -> dict[int, int]:
    """Which attempt wrote which chunks of the stored reply: {first index: attempt}."""
    starts = {0: 1}
    for a in run["attempts"][1:]:
        starts[a.get("resume_from") or 0] = a["attempt"]
    return starts


def assert_exact(reply: Reply, stored: str) -> None:
    """The client reconstructed exactly the stored reply, each part once."""
    assert reply.status == "success"
    assert reply.text == stored
    assert reply.duplicates == 0


def assert_continued_stream(events: list[SseEvent], run: dict[str, Any]) -> None:
    """What a late attacher reads: each attempt's `run_started` (later ones with
    `resume_from`), every chunk index once in order, then `done`; never a `reset`."""
    kinds = [e.event for e in events]
    assert "reset" not in kinds and kinds[-1] == "done"
    starts = [e.data for e in events if e.event == "run_started"]
    assert [s["attempt"] for s in starts] == [a["attempt"] for a in run["attempts"]]
    assert [s.get("resume_from") for s in starts[1:]] == [
        a.get("resume_from") for a in run["attempts"][1:]
    ]
    chunks = [e.data["index"] for e in events if e.event == "chunk"]
    assert chunks == list(range(CHUNKS))
    # Every event says what the client holds after it (contract v3): parts only grow here.
    places = [parse(e.id) for e in events if e.id]
    assert len(places) == len(events) and all(isinstance(p, Position) for p in places)
    held = [p.parts for p in places if isinstance(p, Position)]
    assert held == sorted(held) and held[-1] == CHUNKS


async def assistant_messages(client: AsyncClient, thread: str, run_id: str) -> list[str]:
    return [
        m["content"]
        for m in await client.messages(thread)
        if m["run_id"] == run_id and m["role"] == "assistant"
    ]


async def test_killed_mid_reply_the_reply_continues_for_every_client(cluster: Cluster) -> None:
    thread = unique()
    async with cluster.client() as client:
        run_id = (await client.post(thread, "long", model_options=LONG))["run_id"]
        victim = await running_on(client, cluster, thread, run_id)
        survivors = cluster.others(victim.name)
        on_survivors = [Attacher([p.url], thread).start() for p in survivors]
        # The victim's own client: its connection breaks; it resumes on a survivor.
        on_victim = Attacher(
            [victim.url] + [p.url for p in survivors], thread, reconnects=10
        ).start()
        everyone = [*on_survivors, on_victim]
        await asyncio.gather(*(a.wait_chunk(10) for a in everyone))
        await victim.kill()
        # While the executor is gone, attachers hear it (once), before the replay.
        stall = await on_survivors[0].wait_for(lambda e: e.event == "stalled", timeout=30)
        assert stall.data["executor"] == victim.name
        await victim.restart()
        replies = await asyncio.gather(*(a.result() for a in everyone))
        run = await wait_run(client, thread, run_id)
        assert run["status"] == "success" and run["attempt"] == 2
        resume_from = run["attempts"][1]["resume_from"]
        assert resume_from >= 10  # the chunks stored before the kill were kept
        stored = mock_reply(CHUNKS, {0: 1, resume_from: 2})
        assert run["output"] == stored
        assert await assistant_messages(client, thread, run_id) == [stored]

        for attacher, reply in zip(everyone, replies, strict=True):
            assert_exact(reply, stored)
            assert reply.resets == 0 and "reset" not in [e.event for e in attacher.events]
        assert [e.event for e in on_survivors[0].events].count("stalled") == 1

        late = await asyncio.gather(
            *(Attacher([p.url], thread).start().result() for p in cluster.pods)
        )
        for reply in late:
            assert_exact(reply, stored)
            assert_continued_stream(reply.events, run)


async def test_two_crashes_in_one_run_continue_twice(cluster: Cluster) -> None:
    thread = unique()
    async with cluster.client() as client:
        run_id = (await client.post(thread, "long", model_options=LONG))["run_id"]
        watcher = Attacher(cluster.urls, thread, reconnects=20).start()
        for at_least in (8, 20):
            victim = await running_on(client, cluster, thread, run_id)
            await watcher.wait_chunk(at_least)
            await victim.kill()
            await victim.restart()
        run = await wait_run(client, thread, run_id)
        assert run["status"] == "success" and run["attempt"] == 3
        stored = mock_reply(CHUNKS, continued(run))
        assert len(continued(run)) == 3 and run["output"] == stored
        reply = await watcher.result()
        assert_exact(reply, stored)
        assert reply.resets == 0
        late = await Attacher([cluster.pods[0].url], thread).start().result()
        assert_exact(late, stored)
        assert_continued_stream(late.events, run)


async def test_a_source_that_cannot_continue_regenerates_with_a_reset(cluster: Cluster) -> None:
    """The fallback: the source refuses to continue, the run regenerates (purge, `reset`), and
    every client ends with the regenerated reply alone."""
    thread = unique()
    options = {**LONG, "refuse_continue": True}
    async with cluster.client() as client:
        run_id = (await client.post(thread, "long", model_options=options))["run_id"]
        victim = await running_on(client, cluster, thread, run_id)
        survivor = cluster.others(victim.name)[0]
        watcher = Attacher([survivor.url], thread).start()
        await watcher.wait_chunk(10)
        await victim.kill()
        await victim.restart()
        reply = await watcher.result()
        run = await wait_run(client, thread, run_id)
    assert run["status"] == "success"
    # attempt 2 asked to continue, was refused before it announced anything, and
    # regenerated the whole reply itself: its record says so (kept 0, no resume_from)
    assert run["attempt"] == 2 and run["attempts"][1]["kept"] == 0
    assert "resume_from" not in run["attempts"][1]
    stored = mock_reply(CHUNKS, {0: 2})
    assert run["output"] == stored
    assert_exact(reply, stored)
    resets = [e for e in watcher.events if e.event == "reset"]
    assert [r.data["attempt"] for r in resets] == [2]
    before = watcher.events[: watcher.events.index(resets[0])]
    assert [e.data["index"] for e in before if e.event == "chunk"][:10] == list(range(10))
    late = await Attacher([survivor.url], thread).start().result()
    assert_exact(late, stored)
    assert late.resets == 0


# Queue polls every 0.2 s: the 2 s watch below spans ten of each pod's polls, not one.
@pytest.mark.cluster(queue_polling_s=0.2)
async def test_a_crashed_run_holds_its_thread_until_its_pod_returns(cluster: Cluster) -> None:
    thread = unique()
    async with cluster.client() as client:
        first = (await client.post(thread, "first", model_options=LONG))["run_id"]
        victim = await running_on(client, cluster, thread, first)
        survivor = cluster.others(victim.name)[0]
        watcher = Attacher([survivor.url], thread).start()
        await watcher.wait_chunk(5)
        await victim.kill()
        await watcher.cancel()

        async with cluster.client([survivor]) as on_survivor:
            second = (await on_survivor.post(thread, "second", model_options={"chunks": 5}))[
                "run_id"
            ]
            # DBOS keeps the crashed run's partition slot: the thread's next run waits. Watch it
            # over ten queue polls (a run this short would be done in ~0.2 s if it were
            # dequeued). The
            # wait ends when the name returns (or, past THREADGATE_ADOPT_AFTER_S = 60 s, when a
            # survivor adopts the departed name's runs: tests/multipod/test_faults.py).
            loop = asyncio.get_running_loop()
            until = loop.time() + 2.0
            while loop.time() < until:
                assert (await on_survivor.run(thread, second))["status"] == "pending"
                assert (await on_survivor.run(thread, first))["status"] == "running"
                await asyncio.sleep(0.1)  # paces the polling of the window above

        await victim.restart()
        run_a = await wait_run(client, thread, first)
        run_b = await wait_run(client, thread, second)
        assert run_a["status"] == run_b["status"] == "success"
        assert run_a["attempt"] == 2 and run_b["attempt"] == 1
        assert run_a["finished_at"] <= run_b["started_at"]
        messages = [(m["role"], m["run_id"], m["content"]) for m in await client.messages(thread)]
        assert messages == [
            ("user", first, "first"),
            ("assistant", first, mock_reply(CHUNKS, continued(run_a))),
            ("user", second, "second"),
            ("assistant", second, mock_reply(5)),
        ]
