"""SIGKILL of the pod running a reply: the run is replayed, clients see the reply exactly once."""

from __future__ import annotations

import asyncio

import pytest
from threadgate.client import AsyncClient, SseEvent
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import Attacher, Cluster, final_attempt, running_on, wait_run

pytestmark = pytest.mark.multipod

CHUNKS = 40
LONG = {"chunks": CHUNKS, "delay_ms": 50}  # 2 s of reply: time to kill it in the middle


def assert_one_clean_attempt(events: list[SseEvent], attempt: int) -> None:
    """run_started, chunk-0..chunk-39 once each, in order, then done: all of one attempt."""
    assert [e.event for e in events] == ["run_started"] + ["chunk"] * CHUNKS + ["done"]
    assert {e.data["attempt"] for e in events} == {attempt}
    chunks = [e for e in events if e.event == "chunk"]
    assert [c.data["index"] for c in chunks] == list(range(CHUNKS))
    assert "".join(c.data["text"] for c in chunks) == mock_reply(CHUNKS)
    assert events[-1].data["status"] == "success"
    ids = [int(e.id) for e in events if e.id]
    assert ids == sorted(set(ids)) and len(ids) == len(events)


async def assistant_messages(client: AsyncClient, thread: str, run_id: str) -> list[str]:
    return [
        m["content"]
        for m in await client.messages(thread)
        if m["run_id"] == run_id and m["role"] == "assistant"
    ]


async def test_killed_mid_reply_then_a_late_attacher_sees_only_the_final_attempt(
    cluster: Cluster,
) -> None:
    thread = unique()
    async with cluster.client() as client:
        run_id = (await client.post(thread, "long", model_options=LONG))["run_id"]
        victim = await running_on(client, cluster, thread, run_id)
        watcher = Attacher([cluster.others(victim.name)[0].url], thread).start()
        await watcher.wait_chunk(10)
        await victim.kill()
        await victim.restart()
        run = await wait_run(client, thread, run_id)
        assert run["status"] == "success"
        assert run["attempt"] >= 2
        assert run["output"] == mock_reply(CHUNKS)
        assert (await watcher.result()).text == mock_reply(CHUNKS)

        late = await asyncio.gather(
            *(Attacher([p.url], thread).start().result() for p in cluster.pods)
        )
        for reply in late:
            assert reply.resets == 0
            assert_one_clean_attempt(reply.events, run["attempt"])
            assert reply.text == mock_reply(CHUNKS)
        assert await assistant_messages(client, thread, run_id) == [mock_reply(CHUNKS)]


async def test_attachers_in_flight_get_a_reset_then_the_full_reply(cluster: Cluster) -> None:
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
        await victim.restart()
        replies = await asyncio.gather(*(a.result() for a in everyone))
        run = await wait_run(client, thread, run_id)
        assert run["status"] == "success" and run["attempt"] >= 2
        assert await assistant_messages(client, thread, run_id) == [mock_reply(CHUNKS)]

    for attacher, reply in zip(everyone, replies, strict=True):
        assert reply.text == mock_reply(CHUNKS)
        assert reply.status == "success"
        resets = [e for e in attacher.events if e.event == "reset"]
        assert [r.data["attempt"] for r in resets] == [run["attempt"]]
        after_reset = attacher.events[attacher.events.index(resets[0]) + 1 :]
        assert after_reset == final_attempt(attacher.events)
        assert_one_clean_attempt(after_reset, run["attempt"])
        before = attacher.events[: attacher.events.index(resets[0])]
        assert before and all(e.data["attempt"] < run["attempt"] for e in before)


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
            # for a while (a run this short would be done in ~0.2 s if it were dequeued). The
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
        assert run_a["attempt"] >= 2 and run_b["attempt"] == 1
        assert run_a["finished_at"] <= run_b["started_at"]
        messages = [(m["role"], m["run_id"], m["content"]) for m in await client.messages(thread)]
        assert messages == [
            ("user", first, "first"),
            ("assistant", first, mock_reply(CHUNKS)),
            ("user", second, "second"),
            ("assistant", second, mock_reply(5)),
        ]
