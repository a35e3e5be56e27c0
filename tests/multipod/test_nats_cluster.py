"""Pods on a three-node JetStream cluster (stream R3): the stream leader and the quorum die.

Real processes: three nats-servers clustered over routes (tests/multipod/ha.py), three pods
connected to all three (THREADGATE_NATS_URL lists them), replies with `vary` so any mix of
attempts shows. The stream leader is found from stream info and SIGKILLed mid-reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from threadgate.client import AsyncClient, Reply, parse_sse
from threadgate.settings import load_settings
from threadgate.streams.buffer import JetStreamBuffer, connect_nats

from tests.conftest import Stack, unique
from tests.multipod.cluster import (
    Attacher,
    Cluster,
    metric,
    pod_env,
    running_on,
    unique_names,
    wait_metric,
    wait_run,
)
from tests.multipod.ha import NatsCluster

pytestmark = pytest.mark.multipod

VARY = re.compile(r"chunk-(\d+)\.(\d+) ")


@pytest.fixture
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsCluster]:
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"))
    cluster.start()
    try:
        yield cluster  # type: ignore[misc]
    finally:
        cluster.stop()


def ha_env(stack: Stack, nats_cluster: NatsCluster, **knobs: Any) -> dict[str, str]:
    """Pods on the NATS cluster, stream replicas 3, a stream and database of their own."""
    stream, prefix = unique_names()
    knobs.setdefault("coalesce_ms", 50)  # the product's default (the suite pins it off)
    return pod_env(
        database_url=stack.new_database("ha"),
        nats_url=nats_cluster.url,
        stream=stream,
        prefix=prefix,
        stream_replicas=3,
        **knobs,
    )


async def start_pods(
    stack: Stack, nats_cluster: NatsCluster, log_dir: Path, **knobs: Any
) -> tuple[Cluster, str]:
    env = ha_env(stack, nats_cluster, **knobs)
    pods = Cluster(env, log_dir, 3)
    await pods.start()
    return pods, env["THREADGATE_STREAM_NAME"]


async def stream_leader(nats_cluster: NatsCluster, stream: str) -> str:
    """The server leading the stream now (asked of any live member)."""
    urls = [nats_cluster.servers[n].url for n in nats_cluster.alive()]
    nc = await nats.connect(urls, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=5)
        for _ in range(200):
            with contextlib.suppress(Exception):
                info = await js.stream_info(stream)
                if info.cluster is not None and info.cluster.leader:
                    return str(info.cluster.leader)
            await asyncio.sleep(0.1)  # an election under way: ask again
        raise AssertionError(f"stream {stream} has no leader")
    finally:
        await nc.close()


async def wait_replicas_current(nats_cluster: NatsCluster, stream: str) -> None:
    """Until the stream has a leader and every other member is a current replica again."""
    urls = [nats_cluster.servers[n].url for n in nats_cluster.alive()]
    nc = await nats.connect(urls, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(Exception):
                    info = await js.stream_info(stream)
                    c = info.cluster
                    if (
                        c is not None
                        and c.leader
                        and len(c.replicas or []) == len(nats_cluster.names) - 1
                        and all(r.current and not r.offline for r in c.replicas or [])
                    ):
                        return
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


def vary_attempts(text: str) -> list[int]:
    """The attempt of each chunk of a `vary` reply, checking chunk i is at place i."""
    found = VARY.findall(text)
    assert "".join(f"chunk-{i}.{a} " for i, a in found) == text, text[:200]
    assert [int(i) for i, _ in found] == list(range(len(found))), text[:200]
    return [int(a) for _, a in found]


async def resume_elsewhere(urls: list[str], thread: str, stop_at: int) -> Reply:
    """A client that reads until chunk `stop_at`, hangs up, and comes back on the next pod
    with Last-Event-ID (then on others, whenever a connection breaks)."""
    reply = Reply()
    last_id: str | None = None
    pod = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as http:
        for _ in range(30):
            headers = {"Last-Event-ID": last_id} if last_id else {}
            url = f"{urls[pod % len(urls)]}/threads/{thread}/attach"
            pod += 1
            try:
                async with http.stream("GET", url, headers=headers) as resp:
                    if resp.status_code == 204:
                        return reply
                    if resp.status_code != 200:
                        await resp.aread()
                        await asyncio.sleep(0.2)
                        continue
                    async for ev in parse_sse(resp.aiter_lines()):
                        if ev.id:
                            last_id = ev.id
                        reply.apply(ev)
                        if ev.event == "done":
                            return reply
                        if stop_at >= 0 and ev.event == "chunk" and ev.data["index"] >= stop_at:
                            stop_at = -1
                            break  # hang up: come back elsewhere with Last-Event-ID
            except (httpx.TransportError, httpx.RemoteProtocolError):
                await asyncio.sleep(0.2)
    raise AssertionError(f"{thread}: no done after 30 connections")


async def check_run(
    client: AsyncClient, thread: str, run_id: str, replies: dict[str, Reply]
) -> int:
    """Success, one stored reply equal to what every client ended with; its attempts."""
    final = await wait_run(client, thread, run_id, timeout=90)
    assert final["status"] == "success", final
    messages = [m for m in await client.messages(thread) if m["run_id"] == run_id]
    assert [m["role"] for m in messages] == ["user", "assistant"], messages
    stored = messages[1]["content"]
    vary_attempts(stored)
    for who, reply in replies.items():
        assert reply.status == "success", (who, reply.events[-3:])
        got = [(e.event, e.id, e.data.get("index"), e.data.get("attempt")) for e in reply.events]
        assert reply.text == stored, f"{thread}: the {who} client's reply differs: {got}"
    return int(final["attempt"])


# The slowest of the multipod suite with test_pg_failover (about a minute each).
@pytest.mark.long
async def test_stream_leader_killed_mid_reply(
    stack: Stack, nats_cluster: NatsCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pods, stream = await start_pods(
        stack, nats_cluster, tmp_path_factory.mktemp("pods"), mock_delay_ms=25
    )
    client = pods.client()
    urls = pods.urls
    figures: list[str] = []
    try:
        # Kill points: as runs start, early in the replies, in their middle.
        for round_no, kill_at in enumerate((0, 8, 40)):
            chunks = 100
            threads = [unique(f"r{round_no}") for _ in range(4)]
            runs = {}
            for t in threads:
                opts = {"chunks": chunks, "vary": True}
                runs[t] = (await client.post(t, "through a leader change", model_options=opts))[
                    "run_id"
                ]
            rotate = [urls[i:] + urls[:i] for i in range(3)]
            live = {
                t: Attacher(rotate[i % 3], t, reconnects=20).start() for i, t in enumerate(threads)
            }
            resumers = {
                t: asyncio.create_task(resume_elsewhere(rotate[(i + 1) % 3], t, kill_at + 5))
                for i, t in enumerate(threads)
            }
            if kill_at:
                await asyncio.gather(*(live[t].wait_chunk(kill_at, 60) for t in threads))
            leader = await stream_leader(nats_cluster, stream)
            nats_cluster.kill(leader)
            late = {
                t: Attacher(rotate[(i + 2) % 3], t, reconnects=20).start()
                for i, t in enumerate(threads)
            }
            nats_cluster.restart(leader)
            attempts = {}
            for t in threads:
                replies = {
                    "in-flight": await live[t].result(90),
                    "late": await late[t].result(90),
                    "reconnecting": await asyncio.wait_for(resumers[t], 90),
                    # attached once the run has ended
                    "after": await AsyncClient(urls[round_no % 3]).reply(t),
                }
                attempts[t] = await check_run(client, t, runs[t], replies)
            await wait_replicas_current(nats_cluster, stream)
            stall = max(longest_silence(live[t]) for t in threads)
            figures.append(
                f"kill of leader {leader} at chunk {kill_at}: attempts per run "
                f"{sorted(attempts.values())}; longest an in-flight client went without a "
                f"chunk: {stall:.1f}s"
            )
            # A leader's death is waited out inside the attempt: no new attempt, no reset.
            assert set(attempts.values()) == {1}, attempts
    finally:
        print("\n" + "\n".join(figures))
        await pods.stop()


def longest_silence(attacher: Attacher) -> float:
    """The longest gap between two chunks a client received (the mock sends one per 25 ms)."""
    times = [
        t for t, e in zip(attacher.arrived, attacher.events, strict=True) if e.event == "chunk"
    ]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@pytest.mark.long
async def test_quorum_lost_then_back(
    stack: Stack, nats_cluster: NatsCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two of three servers die mid-reply: no stream leader can be elected. Publishing waits
    THREADGATE_NATS_OUTAGE_LIMIT_S, then each run's attempt fails as transient (seen per run)
    and the run waits within its time budget; once a quorum is back the reply continues: the
    next attempt resumes from the parts stored (`resume_from`, no `reset`). Nothing is lost."""
    pods, stream = await start_pods(
        stack,
        nats_cluster,
        tmp_path_factory.mktemp("pods"),
        mock_delay_ms=25,
        nats_outage_limit_s=3,
        retry_base_s=0.5,
        retry_cap_s=2,
    )
    client = pods.client()
    urls = pods.urls
    try:
        threads = [unique("q") for _ in range(3)]
        runs = {}
        for t in threads:
            opts = {"chunks": 80, "vary": True}
            runs[t] = (await client.post(t, "through a quorum loss", model_options=opts))["run_id"]
        rotate = [urls[i:] + urls[:i] for i in range(3)]
        live = {t: Attacher(rotate[i], t, reconnects=40).start() for i, t in enumerate(threads)}
        await asyncio.gather(*(live[t].wait_chunk(10, 60) for t in threads))
        leader = await stream_leader(nats_cluster, stream)
        other = next(n for n in nats_cluster.names if n != leader)
        nats_cluster.kill(leader)
        nats_cluster.kill(other)

        # The documented outage behaviour: each run's attempt gives up past the limit.
        def gave_up() -> set[str]:
            return {
                str(r.get("run_id"))
                for p in pods.pods
                for r in p.log_records()
                if r.get("msg", "").startswith("attempt failed, next in")
                and "StreamUnavailable" in r.get("msg", "")
            }

        async with asyncio.timeout(60):
            while not set(runs.values()) <= gave_up():  # noqa: ASYNC110 - other processes' logs
                await asyncio.sleep(0.1)
        nats_cluster.restart(leader)  # two of three: a quorum again
        late = {
            t: Attacher(rotate[(i + 1) % 3], t, reconnects=40).start()
            for i, t in enumerate(threads)
        }
        nats_cluster.restart(other)
        attempts = {}
        for t in threads:
            replies = {
                "in-flight": await live[t].result(120),
                "late": await late[t].result(120),
                "after": await AsyncClient(urls[0]).reply(t),
            }
            attempts[t] = await check_run(client, t, runs[t], replies)
        print(f"\nquorum lost mid-reply: attempts per run {sorted(attempts.values())}")
        # The reply continued after the outage: every later attempt resumed (a subject that
        # could not be read while the quorum was away was waited for, never taken for "no
        # parts"), no client reset.
        for t in threads:
            final = await client.run(t, runs[t])
            assert len(final["attempts"]) >= 2, final["attempts"]  # the outage failed one
            decided = [a for a in final["attempts"][1:] if "kept" in a]
            assert decided and all(a.get("resume_from") for a in decided), final["attempts"]
            assert live[t].reply.resets == 0, final["attempts"]
    finally:
        await pods.stop()


async def test_publishes_lost_with_their_leader_are_stored_again_in_order(
    stack: Stack, nats_cluster: NatsCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The leader freezes, swallowing the publishes in flight to it, then dies. A new leader
    stores the publishes that follow the election before the swallowed ones are found
    missing (a window wider than the reply: acks are settled at the end): their acks come
    back below the sequence of the republished ones. Before, that broke the attempt
    (AttemptBroken: a new attempt); now they are published again after them: the executor
    logs each such repair, and there is at least one."""
    pods, stream = await start_pods(
        stack, nats_cluster, tmp_path_factory.mktemp("pods"), publish_window=1000
    )
    client = pods.client()
    try:
        thread = unique("order")
        opts = {"chunks": 250, "delay_ms": 40, "vary": True}
        run = await client.post(thread, "x", model_options=opts)
        live = Attacher(pods.urls, thread, reconnects=20).start()
        await live.wait_chunk(5)
        executor = await running_on(client, pods, thread, run["run_id"])
        leader = await stream_leader(nats_cluster, stream)
        nats_cluster.pause(leader)
        # Publishes go on meanwhile, into the frozen leader's route, lost with it: a few of
        # them, counted by the executor (no sleep standing in for them).
        published = await metric(executor, "threadgate_chunks_published_total")
        await wait_metric(executor, "threadgate_chunks_published_total", published + 5)
        nats_cluster.kill(leader)
        nats_cluster.restart(leader)
        reply = await live.result(120)
        attempts = await check_run(
            client, thread, run["run_id"], {"in-flight": reply, "after": await client.reply(thread)}
        )
        republished = executor.log_text().count("stored out of order")
        print(f"\nattempts {attempts}; parts published again after their successors: {republished}")
        assert attempts == 1
        assert republished >= 1, "no publish was stored out of order: the fault did not land"
    finally:
        await pods.stop()


async def test_a_pod_started_while_jetstream_has_no_quorum_waits_for_it(
    stack: Stack, nats_cluster: NatsCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A pod starting while JetStream cannot answer (two of three servers down: no meta
    leader) waits for it within THREADGATE_NATS_OUTAGE_LIMIT_S instead of exiting (CI saw a pod
    exit 3 on a stream request that timed out), and serves once the quorum is back."""
    down = nats_cluster.names[1:]
    for name in down:
        nats_cluster.kill(name)
    env = ha_env(stack, nats_cluster, nats_outage_limit_s=90)
    pods = Cluster(env, tmp_path_factory.mktemp("pods"), 1)
    pod = pods.pods[0]
    pod.spawn()
    starting = asyncio.create_task(pod.wait_ready(timeout=120))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while "does not answer the stream set-up yet" not in pod.log_text():
            assert pod.alive and not starting.done(), pods.logs()
            assert loop.time() < deadline, pods.logs()
            await asyncio.sleep(0.1)  # paces reading the pod's log for its waiting line
        for name in down:
            nats_cluster.restart(name)
        await starting
        async with pods.client() as client:
            thread = unique()
            run = await client.post(thread, "x", model_options={"chunks": 5})
            done = await wait_run(client, thread, run["run_id"], timeout=60)
            assert done["status"] == "success", done
    finally:
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await pods.stop()


async def test_replicas_are_raised_at_start_and_never_lowered(nats_cluster: NatsCluster) -> None:
    """A start with more replicas raises the stream's; one with fewer (a pod with an older
    config, or an operator who raised them by hand) leaves them: lowering is the operator's."""
    tag = unique("r")[2:]
    urls = ",".join(nats_cluster.servers[n].url for n in nats_cluster.names)

    async def start(replicas: int) -> int:
        settings = load_settings(
            pod_name="replicas-test",
            nats_url=urls,
            stream_name=f"REP_{tag}",
            subject_prefix=f"rep{tag}",
            stream_replicas=replicas,
            stream_max_bytes=16 * 1024**2,
        )
        nc = await connect_nats(settings, "replicas-test")
        try:
            await JetStreamBuffer(settings, nc).ensure_stream()
            info = await nc.jetstream().stream_info(settings.stream_name)
            return int(info.config.num_replicas or 1)
        finally:
            await nc.close()

    assert await start(1) == 1
    assert await start(3) == 3  # raised
    assert await start(1) == 3  # never lowered
