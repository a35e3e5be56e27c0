"""A seeded nemesis: faults at random moments while runs are posted and followed without pause.

Three pods (restarted whenever they die, as a StatefulSet does) and ~60 threads. The schedule
mixes SIGKILL and SIGTERM of random pods, NATS restarts, PostgreSQL restarts, an application
version bump of one pod, interrupt and cancel storms, while every thread posts runs (the mock's
`vary` reply, so any mix of attempts shows) and follows them with a fast, a slow, a
reconnecting or a roaming client (one that hangs up at a random event and stays away past a
tail's linger, so that the pod it comes back to — any pod, a freshly restarted one included —
holds nothing of the thread); now and then a thread's next run is posted while a slow client
still reads the previous one. When the faults stop, every invariant is checked for every
accepted run:

- it reaches a final status within a bound, one the faults explain: `success`, or
  `interrupted` / `cancelled` on a storm's thread when a storm asked for it; never `error`
  (no run here is poisoned, so not even `crashed_repeatedly`);
- each `success` has exactly one stored assistant message, equal to its `output`;
- every stored reply is the mock's `vary` pattern: chunk i of attempt a reads `chunk-{i}.{a} `,
  every index once, in order, attempts never going back (a continued reply is an attempt's
  chunks then a later attempt's), all the requested chunks for a `success`;
- every client reconstructed exactly the stored reply of the run it followed (after applying
  `reset`), whatever its status (a stopped run stores what its clients saw), and its text is
  that pattern too (a duplicate both share fails): no duplicate, no gap, no mix;
- a thread's runs never overlap and finish in the order they were accepted;
- the schedule's faults happened: the pods' exits match the kills, SIGTERMs and the version
  bump, the pods saw each NATS and PostgreSQL restart, storms interrupted runs;
- every pod ends ready.

Clients are one function per kind (`CLIENTS`): a new kind is one more function.

The seed is printed; `NEMESIS_SEED=<seed>` replays a schedule, `NEMESIS_MINUTES=30` runs a long
one (the default is short enough for CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
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
    chunks: dict[str, int] = field(default_factory=dict)  # run id -> chunks asked for
    storm_threads: set[str] = field(default_factory=set)
    cancelled: set[str] = field(default_factory=set)  # run ids a storm asked to cancel
    followed: list[Followed] = field(default_factory=list)
    post_errors: Counter[str] = field(default_factory=Counter)
    bumped: Pod | None = None  # the pod restarted under the next app version
    termed: set[int | None] = field(default_factory=set)  # pids sent SIGTERM


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


Client = Callable[[list[str], str, random.Random], Awaitable[Reply]]


async def attach_once(
    http: httpx.AsyncClient,
    url: str,
    thread: str,
    reply: Reply,
    last_id: str | None,
    after_event: Callable[[], Awaitable[bool]] | None = None,
) -> tuple[str | None, bool]:
    """One attach: apply its events to `reply` until `done`, the pod going away, or
    `after_event` answering True (hang up). The last event id, and whether the reply is
    whole (`done` seen, or a resume at or after it: 204)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    try:
        async with http.stream("GET", f"{url}/threads/{thread}/attach", headers=headers) as resp:
            if resp.status_code == 204:
                if last_id:
                    return last_id, True  # resumed at or after `done`: it has it all
                await asyncio.sleep(0.1)  # paces a retry: nothing to follow yet
                return last_id, False
            if resp.status_code != 200:
                await asyncio.sleep(0.2)  # paces a retry of a refused attach
                return last_id, False
            async for ev in parse_sse(resp.aiter_lines()):
                if ev.id:
                    last_id = ev.id
                reply.apply(ev)
                if ev.event == "done":
                    return last_id, True
                if after_event is not None and await after_event():
                    return last_id, False
    except httpx.HTTPError:
        await asyncio.sleep(0.2)  # the pod went away: reconnect elsewhere
    return last_id, False


async def follow(
    urls: list[str],
    thread: str,
    rng: random.Random,
    after_event: Callable[[], Awaitable[bool]] | None = None,
    away: Callable[[], Awaitable[None]] | None = None,
    reply: Reply | None = None,
) -> Reply:
    """Attach to a thread's latest run until its `done`, on a random pod each time, resuming
    with Last-Event-ID after every break (after `away`, when it hung up)."""
    reply, last_id, whole = reply or Reply(), None, False
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
        while not whole:
            last_id, whole = await attach_once(
                http, rng.choice(urls), thread, reply, last_id, after_event
            )
            if not whole and away is not None:
                await away()
    return reply


async def fast_client(urls: list[str], thread: str, rng: random.Random) -> Reply:
    """Reads every event as it comes."""
    return await follow(urls, thread, rng)


async def slow_client(urls: list[str], thread: str, rng: random.Random) -> Reply:
    """Takes 10-100 ms over each event."""

    async def read_slowly() -> bool:
        await asyncio.sleep(rng.uniform(0.01, 0.1))  # a slow reader
        return False

    return await follow(urls, thread, rng, read_slowly)


async def reconnecting_client(urls: list[str], thread: str, rng: random.Random) -> Reply:
    """Hangs up after 3-15 events each time and comes back with Last-Event-ID."""
    budget = rng.randint(3, 15)

    async def hang_up() -> bool:
        nonlocal budget
        budget -= 1
        if budget > 0:
            return False
        budget = rng.randint(3, 15)
        return True

    return await follow(urls, thread, rng, hang_up)


async def roaming_client(urls: list[str], thread: str, rng: random.Random) -> Reply:
    """Hangs up at a random event (1-40), stays away past THREADGATE_TAIL_LINGER_S (3 s) now
    and then, and comes back with Last-Event-ID on a random pod: one with no tail for the
    thread, or one restarted meanwhile (contract v3: any pod serves its place)."""
    budget = rng.randint(1, 40)

    async def hang_up() -> bool:
        nonlocal budget
        budget -= 1
        if budget > 0:
            return False
        budget = rng.randint(1, 40)
        return True

    async def away() -> None:
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(3.2, 5))  # past the tail's linger: nothing in memory

    return await follow(urls, thread, rng, hang_up, away)


CLIENTS: dict[str, Client] = {
    "fast": fast_client,
    "slow": slow_client,
    "reconnecting": reconnecting_client,
    "roaming": roaming_client,
}


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
            tally.chunks[run_id] = options["chunks"]
            if rng.random() < 0.2:
                await next_run_while_reading(cluster, client, thread, run_id, rng, tally, stop)
            else:
                kind = rng.choice(sorted(CLIENTS))
                reply = await CLIENTS[kind](cluster.urls, thread, rng)
                tally.followed.append(Followed(thread, run_id, kind, reply))
            await asyncio.sleep(rng.uniform(0.5, 3))  # the user reads the reply


async def next_run_while_reading(
    cluster: Cluster,
    client: AsyncClient,
    thread: str,
    run_id: str,
    rng: random.Random,
    tally: Tally,
    stop: asyncio.Event,
) -> None:
    """A slow client of `run_id` while the thread's next run is posted (it purges the subject
    and fills the tails): the slow one ends with its own run's reply, another follows the next."""
    reply = Reply()
    reading = asyncio.create_task(
        follow(cluster.urls, thread, rng, _slowly(rng, 0.02, 0.2), reply=reply)
    )
    async with asyncio.timeout(120):
        while not reply.events and not reading.done():  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # paces looking for its first event: it follows `run_id`
    options = {"chunks": rng.randint(10, 60), "delay_ms": 20, "vary": True}
    following = await post(client, thread, options, "enqueue", stop)
    if following is not None:
        tally.accepted[following] = thread
        tally.chunks[following] = options["chunks"]
    tally.followed.append(Followed(thread, run_id, "slow, next run posted", await reading))
    if following is not None:
        after = await fast_client(cluster.urls, thread, rng)
        tally.followed.append(Followed(thread, following, "after a next run", after))
    tally.faults["next run while reading"] += 1


def _slowly(rng: random.Random, low: float, high: float) -> Callable[[], Awaitable[bool]]:
    async def read_slowly() -> bool:
        await asyncio.sleep(rng.uniform(low, high))  # a slow reader
        return False

    return read_slowly


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
                    tally.chunks[run_id] = 30
            tally.faults["interrupt storm"] += 1
            with contextlib.suppress(Exception):
                for run in await client.runs(thread, limit=5):
                    if run["status"] not in TERMINAL and rng.random() < 0.5:
                        tally.cancelled.add(run["run_id"])  # asked for, answered or not
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
            pod = rng.choice(alive)
            if pod.pid in tally.termed:
                tally.faults["kill while draining"] += 1  # its SIGTERM's exit is this one
            await pod.kill()
        elif action == "term" and alive:
            pod = rng.choice(alive)
            tally.termed.add(pod.pid)
            pod.send_term()
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
            tally.termed.add(pod.pid)
            pod.send_term()
            bumped = True
            tally.bumped = pod
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
    tally = Tally(storm_threads=set(storm_threads))
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
        runs = await check_invariants(cluster, tally)
        check_faults_happened(cluster, sup, tally, runs)
    print(
        f"nemesis: seed {seed}, {MINUTES} min, faults {dict(tally.faults)} (pod exits "
        f"{len(sup.exits)}), runs {len(tally.accepted)}, clients {len(tally.followed)} "
        f"({dict(Counter(f.kind for f in tally.followed))}), violations: 0"
    )


async def check_invariants(cluster: Cluster, tally: Tally) -> dict[str, dict[str, Any]]:
    """Every invariant of the module docstring but the faults'; the runs by id."""
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
        for run_id in tally.accepted:
            run = runs[run_id]
            assert run["status"] in explained_statuses(run, tally), run
            if run["output"] is not None:
                whole = tally.chunks[run_id] if run["status"] == "success" else None
                assert_vary_pattern(run["output"], run, whole)
            else:
                assert run["status"] != "success", run
        for f in tally.followed:
            run = runs[f.run_id] if f.reply.run_id == f.run_id else runs.get(f.reply.run_id or "")
            assert run is not None, f
            assert f.reply.status == run["status"], (f.kind, f.reply.status, run)
            assert f.reply.duplicates == 0, (f.kind, run["run_id"])
            # Whatever ended the run, the stored reply is what its clients hold (contract v3).
            assert f.reply.text == (run["output"] or ""), (f.kind, run["run_id"], run["attempts"])
            assert_vary_pattern(f.reply.text, run, None)
        for pod in cluster.pods:
            async with httpx.AsyncClient(timeout=5) as http:
                ready = (await http.get(f"{pod.url}/readyz")).json()
            assert ready["status"] == "ready", (pod.name, ready)
    return runs


def explained_statuses(run: dict[str, Any], tally: Tally) -> set[str]:
    """The final statuses the schedule can explain for a run: `success`; on a storm's thread
    `interrupted` (a later run of its burst interrupted it) and, when a storm asked to cancel
    it, `cancelled`. Never `error`: nothing here makes a run fail, and a pod killed under a
    run is replayed (only a run poisoned on purpose, which the nemesis has none of, may end
    `crashed_repeatedly`)."""
    allowed = {"success"}
    if run["thread_id"] in tally.storm_threads:
        allowed.add("interrupted")
        if run["run_id"] in tally.cancelled:
            allowed.add("cancelled")
    return allowed


VARY_CHUNK = re.compile(r"chunk-(\d+)\.(\d+) ")


def assert_vary_pattern(text: str, run: dict[str, Any], chunks: int | None) -> None:
    """`text` is the mock's `vary` reply of `run` (or a prefix of it): chunk i of attempt a
    is `chunk-{i}.{a} `; every index from 0 once, in order; the attempts never go back (a
    continued reply is an attempt's chunks, then a later attempt's) and are attempts the run
    had; with `chunks`, all of them. Coalescing merges chunks into one part, never changes
    their text, so this holds whatever the parts were."""
    tokens = VARY_CHUNK.findall(text)
    assert "".join(f"chunk-{i}.{a} " for i, a in tokens) == text, (run["run_id"], text)
    indexes = [int(i) for i, _ in tokens]
    attempts = [int(a) for _, a in tokens]
    assert indexes == list(range(len(indexes))), (run["run_id"], text)
    assert attempts == sorted(attempts), (run["run_id"], text)
    assert all(1 <= a <= run["attempt"] for a in attempts), (run["run_id"], run["attempt"], text)
    if chunks is not None:
        assert len(indexes) == chunks, (run["run_id"], chunks, text)


def check_faults_happened(
    cluster: Cluster, sup: Supervisor, tally: Tally, runs: dict[str, dict[str, Any]]
) -> None:
    """What the schedule did, seen from the pods: a schedule whose faults never landed would
    pass every invariant above without having tested anything."""
    f = tally.faults
    killed = sum(1 for _, code in sup.exits if code == -signal.SIGKILL)
    others = len(sup.exits) - killed
    assert killed == f["kill"], (sup.exits, dict(f))
    # Every SIGTERM (a drain, or the version bump's) ended its pod, by itself or by a SIGKILL
    # that came while it drained.
    assert others >= f["term"] + f["bump"] - f["kill while draining"], (sup.exits, dict(f))
    logs = [p.log_text() for p in cluster.pods]
    assert sum(t.count("nats pod reconnected") for t in logs) >= f["nats"], dict(f)
    assert sum(t.count("executor claim re-acquired") for t in logs) >= f["pg"], dict(f)
    if tally.bumped is not None:
        assert "Application version: nemesis-v2" in tally.bumped.log_text(), tally.bumped.name
    if f["interrupt storm"]:
        ended = Counter(
            runs[r]["status"] for r, t in tally.accepted.items() if t in tally.storm_threads
        )
        assert ended["interrupted"] >= 1, (ended, dict(f))
    assert f["kill"] + f["term"] + f["nats"] + f["pg"] + f["bump"] > 0, dict(f)


__all__ = ["Pod"]
