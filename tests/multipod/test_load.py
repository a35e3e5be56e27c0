"""Under load: a rolling restart and a seeded chaos schedule, with every reply exact.

Conversations keep posting until every planned action has happened, each starting at a
different pod so that every pod accepts (and so executes) runs. Replies use the mock's `vary`
text: a stored reply says which attempt wrote each chunk, and each client's text must be that
reply exactly.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from threadgate.client import AsyncClient, Reply, ThreadgateError, Unreachable
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unique
from tests.multipod.cluster import Cluster, Pod, at, running_on, wait_run
from tests.multipod.test_faults import continued

pytestmark = pytest.mark.multipod

DELAY_MS = 20  # the clusters' THREADGATE_MOCK_DELAY_MS


@dataclass
class Conversation:
    """One thread driven like a chat user: post, follow the reply to `done`, post again."""

    thread: str
    index: int
    chunks: int  # conversations' replies differ in length, so their turns do not line up
    replies: list[Reply] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)


@dataclass
class Load:
    """Conversations that go on until `stop` is set, and what their clients met."""

    urls: list[str]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    refused: int = 0  # POSTs answered 503 (a draining pod): the client went on to the next pod

    async def count_refusals(self, resp: httpx.Response) -> None:
        if resp.request.method == "POST" and resp.status_code == 503:
            self.refused += 1


async def converse(conv: Conversation, load: Load) -> None:
    i = 0
    while not load.stop.is_set() or i == 0:
        start = (conv.index + i) % len(load.urls)
        urls = load.urls[start:] + load.urls[:start]
        async with AsyncClient(urls) as client:
            client.http.event_hooks["response"].append(load.count_refusals)
            key = f"{conv.thread}-{i}"  # the same key on every try: never a second run
            while True:
                try:
                    run = await client.post(
                        conv.thread,
                        f"m{i}",
                        model_options={"chunks": conv.chunks, "vary": True},
                        idempotency_key=key,
                    )
                    break
                except (Unreachable, ThreadgateError) as exc:
                    if isinstance(exc, ThreadgateError) and exc.status != 503:
                        raise
                    await asyncio.sleep(0.1)  # paces retries while every pod is away
            conv.run_ids.append(run["run_id"])
            reply = Reply()
            async for ev in client.events(conv.thread, reconnects=200):
                reply.apply(ev)
            assert reply.run_id == run["run_id"], (reply.run_id, run["run_id"])
            conv.replies.append(reply)
        i += 1


async def check(load: Load, convs: list[Conversation]) -> list[dict[str, Any]]:
    """Every client got exactly the stored reply, and each run's is stored once. The runs."""
    async with AsyncClient(load.urls) as client:

        async def one(conv: Conversation) -> list[dict[str, Any]]:
            runs, outputs = [], []
            for reply, run_id in zip(conv.replies, conv.run_ids, strict=True):
                run = await wait_run(client, conv.thread, run_id)
                stored = mock_reply(conv.chunks, continued(run))
                assert run["status"] == reply.status == "success", (run, reply)
                assert run["output"] == stored == reply.text, run
                assert reply.duplicates == 0
                outputs.append(stored)
                runs.append(run)
            messages = await client.messages(conv.thread)
            assert [m["role"] for m in messages] == ["user", "assistant"] * len(conv.run_ids)
            assert [m["content"] for m in messages if m["role"] == "assistant"] == outputs
            return runs

        return [run for runs in await asyncio.gather(*map(one, convs)) for run in runs]


async def executing(pod: Pod, convs: list[Conversation], *, left: int, timeout: float = 60) -> str:
    """Wait until `pod` executes one of the conversations' runs with at least `left` of its
    chunks still to come (reckoned at DELAY_MS a chunk since it started, which a busy machine
    only slows); that run's id."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    candidates = [c for c in convs if c.chunks > left]
    async with httpx.AsyncClient(timeout=5) as http:

        async def current(conv: Conversation) -> str | None:
            if not conv.run_ids:
                return None
            try:
                resp = await http.get(f"{pod.url}/threads/{conv.thread}/runs/{conv.run_ids[-1]}")
            except httpx.TransportError:
                return None
            run = resp.json()
            if run.get("status") != "running" or run.get("executor") != pod.name:
                return None
            since = time.time() - at(run["started_at"]).timestamp()
            return str(run["run_id"]) if conv.chunks - since * 1000 / DELAY_MS >= left else None

        while True:
            found = [r for r in await asyncio.gather(*map(current, candidates)) if r]
            if found:
                return found[0]
            assert loop.time() < deadline, f"{pod.name} executed none of the runs"
            await asyncio.sleep(0.02)  # paces polling the runs' executors


@pytest.mark.long
@pytest.mark.cluster(size=3, mock_delay_ms=DELAY_MS, drain_timeout_s=10)
async def test_rolling_restart_under_load(cluster: Cluster) -> None:
    """Pod after pod gets SIGTERM while it executes a long run (3 s of reply) besides the
    conversations' runs: it drains, the run finishes there, and meanwhile its POSTs answer 503
    and the clients post on the next pod."""
    load = Load(cluster.urls)
    convs = [Conversation(unique("roll"), i, 20 + 15 * (i % 3)) for i in range(10)]
    tasks = asyncio.gather(*(converse(c, load) for c in convs))
    drained: list[tuple[Pod, str, str]] = []
    try:
        # One pod at a time, as a StatefulSet rolling update does. Under load any pod's claim
        # may take the long run: the pod that executes it is the next to go.
        for _ in range(12):
            pending = [p for p in cluster.pods if p not in [d[0] for d in drained]]
            if not pending:
                break
            thread = unique("long")
            async with cluster.client([pending[0]]) as on_pod:
                run = await on_pod.post(thread, "long", model_options={"chunks": 150, "vary": True})
                pod = await running_on(on_pod, cluster, thread, run["run_id"])
            if pod not in pending:
                continue  # that pod had its turn: the run just finishes there
            assert await pod.term(60) == 0
            drained.append((pod, thread, run["run_id"]))
            await pod.restart()
        assert len(drained) == len(cluster.pods)
        load.stop.set()
        await asyncio.wait_for(tasks, 240)
    finally:
        tasks.cancel()
    runs = await check(load, convs)
    async with cluster.client() as client:
        for pod, thread, run_id in drained:
            run = await wait_run(client, thread, run_id)
            # The long run finished in its drain, on its pod, in one attempt.
            assert (run["status"], run["executor"]) == ("success", pod.name)
            assert run["output"] == mock_reply(150, {0: 1})
    # Drains let their runs finish: a rolling restart costs no run a second attempt.
    assert [r for r in runs if r["attempt"] != 1] == []
    for pod in cluster.pods:
        msgs = [r["msg"] for r in pod.log_records(start=1)]
        draining = next(i for i, m in enumerate(msgs) if m.startswith("draining"))
        finished = [i for i, m in enumerate(msgs) if m == "run finished: success"]
        # The drain had work: runs finished after it began, before the pod stopped.
        assert any(draining < i < msgs.index("pod stopped") for i in finished), pod.name
        assert not any(m.startswith("drain timeout") for m in msgs)
    assert load.refused > 0  # POSTs met a draining pod and went on to the next one
    print(f"\n{len(runs)} runs; {load.refused} POSTs answered 503 and retried on another pod")


@pytest.mark.long
@pytest.mark.cluster(size=3, mock_delay_ms=DELAY_MS)
async def test_chaos_kills_and_a_nats_restart(cluster: Cluster, stack: Stack) -> None:
    seed = int(os.environ.get("THREADGATE_CHAOS_SEED", time.time_ns() % 1_000_000))
    print(f"\nchaos seed {seed} (replay: THREADGATE_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    load = Load(cluster.urls)
    convs = [Conversation(unique("chaos"), i, 20 + 10 * (i % 3)) for i in range(8)]
    tasks = asyncio.gather(*(converse(c, load) for c in convs))
    schedule: list[tuple[str, Pod | None]] = [("kill", rng.choice(cluster.pods)) for _ in range(4)]
    schedule.insert(rng.randrange(len(schedule) + 1), ("nats", None))
    try:
        # The load goes on until every action has happened.
        for action, pod in schedule:
            await asyncio.sleep(rng.uniform(0.5, 2.0))  # the random schedule's clock
            if action == "nats":
                stack.nats.stop()
                await asyncio.sleep(rng.uniform(0.2, 1.5))  # how long NATS stays down
                stack.nats.start()
            else:
                assert pod is not None
                # A kill that finds nothing to break proves nothing: one mid-reply.
                await executing(pod, convs, left=5)
                await pod.kill()
                await pod.restart()
        load.stop.set()
        await asyncio.wait_for(tasks, 240)
    finally:
        tasks.cancel()
    runs = await check(load, convs)
    replies = [r for c in convs for r in c.replies]
    replayed = [r for r in runs if r["attempt"] >= 2]
    assert replayed, "no kill cost a run an attempt"
    # A client that followed a replayed run saw it continue (or regenerate, with a reset).
    assert sum(r.resumes + r.resets for r in replies) >= 1
    print(
        f"{len(runs)} runs, {len(replayed)} replayed;"
        f" clients saw {sum(r.resumes for r in replies)} continuations,"
        f" {sum(r.resets for r in replies)} resets"
    )
