"""A seeded nemesis: faults at random moments while runs are posted and followed without pause.

Three pods (restarted whenever they die, as a StatefulSet does) and ~60 threads. The schedule
mixes SIGKILL and SIGTERM of random pods, NATS restarts, PostgreSQL restarts, an application
version bump of one pod, interrupt and cancel storms, while every thread posts runs (the mock's
`vary` reply, so any mix of attempts shows) and follows them with a fast, a slow or a
reconnecting client. When the faults stop, every invariant is checked for every accepted run:

- it reaches a final status within a bound;
- each `success` has exactly one stored assistant message, equal to its `output`;
- every client reconstructed exactly the stored reply of the run it followed (after applying
  `reset`): no duplicate, no gap, no mix;
- a thread's runs never overlap and finish in the order they were accepted;
- every pod ends ready.

The seed is printed; `NEMESIS_SEED=<seed>` replays a schedule, `NEMESIS_MINUTES=30` runs a long
one (the default is short enough for CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from threadgate.client import AsyncClient, Reply, parse_sse

from tests.conftest import Stack
from tests.multipod.cluster import TERMINAL, Cluster, Pod, Supervisor, at
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod

MINUTES = float(os.environ.get("NEMESIS_MINUTES", "1.5"))
THREADS = 60
SETTLE_S = 240  # after the faults stop, every run has this long to end


@dataclass
class Followed:
    """What one client saw of one run."""

    thread: str
    run_id: str
    kind: str
    reply: Reply


@dataclass
class Tally:
    faults: Counter[str] = field(default_factory=Counter)
    accepted: dict[str, str] = field(default_factory=dict)  # run id -> thread
    followed: list[Followed] = field(default_factory=list)
    post_errors: Counter[str] = field(default_factory=Counter)


async def post(
    client: AsyncClient, thread: str, options: dict[str, Any], strategy: str, stop: asyncio.Event
) -> str | None:
    """Post until accepted (the same Idempotency-Key every try: one run however often)."""
    key = f"nemesis-{uuid.uuid4()}"
    while True:
        try:
            accepted = await client.post(
                thread, "go", strategy=strategy, model_options=options, idempotency_key=key
            )
            return str(accepted["run_id"])
        except Exception as exc:  # every pod down or draining, PostgreSQL away: try again
            if stop.is_set() and "429" in repr(exc):
                return None
            await asyncio.sleep(0.2)  # paces retries of a refused POST


async def follow(urls: list[str], thread: str, kind: str, rng: random.Random) -> Reply:
    """One client of a thread's latest run until its `done`: fast, slow or reconnecting."""
    reply = Reply()
    last_id: str | None = None
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
        while reply.status is None:
            url = rng.choice(urls)
            headers = {"Last-Event-ID": last_id} if last_id else {}
            budget = rng.randint(3, 15) if kind == "reconnecting" else None
            try:
                async with http.stream(
                    "GET", f"{url}/threads/{thread}/attach", headers=headers
                ) as resp:
                    if resp.status_code == 204:
                        if last_id:
                            return reply  # resumed at or after `done`: it has it all
                        await asyncio.sleep(0.1)  # paces a retry: nothing to follow yet
                        continue
                    if resp.status_code != 200:
                        await asyncio.sleep(0.2)  # paces a retry of a refused attach
                        continue
                    async for ev in parse_sse(resp.aiter_lines()):
                        if ev.id:
                            last_id = ev.id
                        reply.apply(ev)
                        if ev.event == "done":
                            break
                        if kind == "slow":
                            await asyncio.sleep(rng.uniform(0.01, 0.1))  # a slow reader
                        if budget is not None:
                            budget -= 1
                            if budget <= 0:
                                break  # hang up; come back with Last-Event-ID
            except httpx.HTTPError:
                await asyncio.sleep(0.2)  # the pod went away: reconnect elsewhere
    return reply


async def thread_worker(
    cluster: Cluster, thread: str, rng: random.Random, tally: Tally, stop: asyncio.Event
) -> None:
    async with cluster.client() as client:
        while not stop.is_set():
            options = {"chunks": rng.randint(10, 60), "delay_ms": 20, "vary": True}
            run_id = await post(client, thread, options, "enqueue", stop)
            if run_id is None:
                return
            tally.accepted[run_id] = thread
            kind = rng.choice(["fast", "slow", "reconnecting"])
            reply = await follow(cluster.urls, thread, kind, rng)
            tally.followed.append(Followed(thread, run_id, kind, reply))
            await asyncio.sleep(rng.uniform(0.5, 3))  # the user reads the reply


async def storms(
    cluster: Cluster, threads: list[str], rng: random.Random, tally: Tally, stop: asyncio.Event
) -> None:
    """Bursts of interrupts on one thread, and cancels of whatever runs there."""
    async with cluster.client() as client:
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(2, 6))  # between storms
            thread = rng.choice(threads)
            burst = [
                post(
                    client, thread, {"chunks": 30, "delay_ms": 20, "vary": True}, "interrupt", stop
                )
                for _ in range(rng.randint(3, 8))
            ]
            for run_id in await asyncio.gather(*burst):
                if run_id is not None:
                    tally.accepted[run_id] = thread
            tally.faults["interrupt storm"] += 1
            with contextlib.suppress(Exception):
                for run in await client.runs(thread, limit=5):
                    if run["status"] not in TERMINAL and rng.random() < 0.5:
                        with contextlib.suppress(Exception):
                            await client.cancel(thread, run["run_id"])
                            tally.faults["cancel"] += 1


async def nemesis(
    cluster: Cluster,
    stack: Stack,
    sup: Supervisor,
    rng: random.Random,
    tally: Tally,
    until: float,
) -> None:
    bumped = False
    pg_restarts = 0
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(1.5, 5))  # the time between two faults
        alive = [p for p in cluster.pods if p.alive]
        action = rng.choices(
            ["kill", "term", "nats", "pg", "bump"],
            weights=[5, 3, 2, 1 if pg_restarts < 2 else 0, 1 if not bumped else 0],
        )[0]
        if action == "kill" and alive:
            await rng.choice(alive).kill()
        elif action == "term" and alive:
            rng.choice(alive).send_term()
        elif action == "nats":
            stack.nats.stop(kill=rng.random() < 0.5)
            await asyncio.sleep(rng.uniform(0.5, 4))  # the outage
            stack.nats.start()
        elif action == "pg":
            # A clean restart: the test session's PostgreSQL runs with fsync and synchronous
            # commit off (speed), so a SIGKILL there could lose acknowledged commits, which no
            # production database does (a failover is tests/multipod/test_pg_failover.py's).
            stack.pg.stop()
            await asyncio.sleep(rng.uniform(0.5, 4))  # the outage
            stack.pg.start()
            pg_restarts += 1
        elif action == "bump" and alive:
            pod = rng.choice(alive)
            pod.env["THREADGATE_APP_VERSION"] = "nemesis-v2"  # the supervisor restarts it so
            pod.send_term()
            bumped = True
        else:
            continue
        tally.faults[action] += 1


@pytest.mark.long
@pytest.mark.timeout(MINUTES * 60 + 2 * SETTLE_S + 300)
async def test_nemesis(start_cluster: StartCluster, stack: Stack) -> None:
    seed = int(os.environ.get("NEMESIS_SEED", random.randrange(2**32)))
    print(f"\nNEMESIS_SEED={seed} NEMESIS_MINUTES={MINUTES}")
    rng = random.Random(seed)
    cluster = await start_cluster(
        size=3,
        mock_delay_ms=20,
        drain_timeout_s=3,
        adopt_after_s=5,
        adopt_check_s=1,
        heartbeat_s=0.5,
        nats_outage_limit_s=5,
        retry_base_s=0.2,
        retry_cap_s=2,
        app_version="nemesis-v1",
        coalesce_ms=50,  # the product's default: parts merge under load (the suites pin it off)
    )
    threads = [f"nem-{seed % 10_000}-{i}" for i in range(THREADS)]
    storm_threads = threads[-5:]
    tally = Tally()
    stop = asyncio.Event()
    async with cluster.supervised() as sup:
        workers = [
            asyncio.create_task(thread_worker(cluster, t, random.Random(rng.random()), tally, stop))
            for t in threads[:-5]
        ]
        workers.append(asyncio.create_task(storms(cluster, storm_threads, rng, tally, stop)))
        until = time.monotonic() + MINUTES * 60
        await nemesis(cluster, stack, sup, random.Random(rng.random()), tally, until)
        stop.set()
        # The faults stopped: every worker's last run ends and is followed to its `done`.
        async with asyncio.timeout(SETTLE_S):
            await asyncio.gather(*workers)
        for pod in cluster.pods:
            await pod.wait_ready(120)
        await check_invariants(cluster, tally)
    print(
        f"nemesis: seed {seed}, {MINUTES} min, faults {dict(tally.faults)} (pod exits "
        f"{len(sup.exits)}), runs {len(tally.accepted)}, clients {len(tally.followed)} "
        f"({dict(Counter(f.kind for f in tally.followed))}), violations: 0"
    )


async def check_invariants(cluster: Cluster, tally: Tally) -> None:
    async with cluster.client() as client:
        runs: dict[str, dict[str, Any]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        for thread in sorted(set(tally.accepted.values())):
            while True:
                listed = await client.runs(thread, limit=None)
                if all(r["status"] in TERMINAL for r in listed) or loop.time() > deadline:
                    break
                await asyncio.sleep(0.5)  # paces polling runs that are still ending
            for r in listed:
                runs[r["run_id"]] = r
            # A thread's runs never overlap and finish in the order they were accepted.
            ran = [r for r in reversed(listed) if r["started_at"] is not None]
            for a, b in itertools.pairwise(ran):
                assert at(a["finished_at"]) <= at(b["started_at"]), (thread, a, b)
            messages = await client.messages(thread)
            assistant = Counter(m["run_id"] for m in messages if m["role"] == "assistant")
            for r in listed:
                if r["status"] == "success":
                    assert assistant[r["run_id"]] == 1, r
                    stored = [
                        m["content"]
                        for m in messages
                        if m["run_id"] == r["run_id"] and m["role"] == "assistant"
                    ]
                    assert stored == [r["output"]], r
        unfinished = [r for r in runs.values() if r["status"] not in TERMINAL]
        assert not unfinished, unfinished
        assert set(tally.accepted) <= set(runs)
        for f in tally.followed:
            run = runs[f.run_id] if f.reply.run_id == f.run_id else runs.get(f.reply.run_id or "")
            assert run is not None, f
            assert f.reply.status == run["status"], (f.kind, f.reply.status, run)
            assert f.reply.duplicates == 0, (f.kind, run["run_id"])
            if run["status"] in ("success", "interrupted") and run["output"] is not None:
                assert f.reply.text == run["output"], (f.kind, run["run_id"], run["attempts"])
        for pod in cluster.pods:
            async with httpx.AsyncClient(timeout=5) as http:
                ready = (await http.get(f"{pod.url}/readyz")).json()
            assert ready["status"] == "ready", (pod.name, ready)


__all__ = ["Pod"]
