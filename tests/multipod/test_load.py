"""Under load: a rolling restart and a seeded chaos schedule, with every reply exact."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest
from threadgate.client import AsyncClient, Reply
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unique
from tests.multipod.cluster import Cluster, Pod, wait_run

pytestmark = pytest.mark.multipod

CHUNKS = 12


@dataclass
class Conversation:
    """One thread driven like a chat user: post, follow the reply to `done`, post again."""

    thread: str
    runs: int
    replies: list[Reply] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)


async def post_anywhere(
    http: httpx.AsyncClient, urls: list[str], thread: str, text: str, key: str
) -> str:
    """POST with an Idempotency-Key, retrying on other pods while one drains or restarts."""
    body = {"input": text, "model_options": {"chunks": CHUNKS}}
    for attempt in range(200):
        url = urls[attempt % len(urls)]
        try:
            resp = await http.post(
                f"{url}/threads/{thread}/runs", json=body, headers={"Idempotency-Key": key}
            )
        except httpx.TransportError:
            await asyncio.sleep(0.05)  # paces retries while a pod restarts
            continue
        if resp.status_code in (200, 202):
            return str(resp.json()["run_id"])
        assert resp.status_code == 503, resp.text
        await asyncio.sleep(0.05)  # paces retries while a pod drains
    raise AssertionError(f"no pod accepted a run on {thread}")


async def converse(conv: Conversation, urls: list[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as http, AsyncClient(urls) as client:
        for i in range(conv.runs):
            run_id = await post_anywhere(http, urls, conv.thread, f"m{i}", f"{conv.thread}-{i}")
            conv.run_ids.append(run_id)
            reply = Reply()
            async for ev in client.events(conv.thread, reconnects=200):
                reply.apply(ev)
            assert reply.run_id == run_id, (reply.run_id, run_id)
            conv.replies.append(reply)


async def check(convs: list[Conversation], urls: list[str]) -> None:
    async with AsyncClient(urls) as client:
        for conv in convs:
            for reply in conv.replies:
                assert reply.status == "success", reply
                assert reply.text == mock_reply(CHUNKS)
            for run_id in conv.run_ids:
                run = await wait_run(client, conv.thread, run_id)
                assert run["status"] == "success"
            messages = await client.messages(conv.thread)
            assert [m["role"] for m in messages] == ["user", "assistant"] * conv.runs
            assert [m["content"] for m in messages if m["role"] == "assistant"] == [
                mock_reply(CHUNKS)
            ] * conv.runs


async def restart(pod: Pod, *, kill: bool) -> None:
    if kill:
        await pod.kill()
    else:
        assert await pod.term(60) == 0
    await pod.restart()


@pytest.mark.cluster(size=3, mock_delay_ms=20, drain_timeout_s=10)
async def test_rolling_restart_under_load(cluster: Cluster) -> None:
    convs = [Conversation(unique("roll"), runs=5) for _ in range(20)]
    load = asyncio.gather(*(converse(c, cluster.urls) for c in convs))
    for pod in cluster.pods:  # one by one, as a StatefulSet rolling update does
        await asyncio.sleep(1.0)  # paces the rollout against the load, like maxUnavailable=1
        await restart(pod, kill=False)
    await asyncio.wait_for(load, 240)
    assert sum(len(c.replies) for c in convs) == 100
    await check(convs, cluster.urls)


@pytest.mark.cluster(size=3, mock_delay_ms=20)
async def test_chaos_kills_and_a_nats_restart(cluster: Cluster, stack: Stack) -> None:
    seed = int(os.environ.get("THREADGATE_CHAOS_SEED", time.time_ns() % 1_000_000))
    print(f"\nchaos seed {seed} (replay: THREADGATE_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    convs = [Conversation(unique("chaos"), runs=3) for _ in range(10)]
    load = asyncio.ensure_future(asyncio.gather(*(converse(c, cluster.urls) for c in convs)))
    schedule = [("kill", rng.choice(cluster.pods)) for _ in range(4)]
    schedule.insert(rng.randrange(len(schedule) + 1), ("nats", None))
    for action, pod in schedule:
        await asyncio.sleep(rng.uniform(0.5, 2.0))  # the random schedule's clock
        if load.done():
            break
        if action == "nats":
            stack.nats.stop()
            await asyncio.sleep(rng.uniform(0.2, 1.5))  # how long NATS stays down
            stack.nats.start()
        else:
            assert pod is not None
            await restart(pod, kill=True)
    await asyncio.wait_for(load, 240)
    await check(convs, cluster.urls)
