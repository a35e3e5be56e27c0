"""The README's promises that no other test kept, each on real processes: cancel from another
pod and its fallback when the control message is lost, one shared consumer per thread per
pod, outages past the NATS limit, retry backoff, run timeouts across crashes, and database
writes that do not grow with the reply."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import nats
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from threadgate.client import AsyncClient, Reply
from threadgate.devstack import Postgres, make_state_dir
from threadgate.models.mock import mock_reply
from threadgate.settings import Settings
from threadgate.workflows.attempts import _backoff as backoff

from tests.conftest import Stack, unique
from tests.multipod.cluster import (
    Attacher,
    Cluster,
    Pod,
    at,
    pod_env,
    running_on,
    stored_messages,
    unique_names,
    wait_run,
)
from tests.multipod.conftest import StartCluster, logs_on_failure
from tests.multipod.test_faults import wait_logged

pytestmark = pytest.mark.multipod


# --- database writes do not grow with the reply -------------------------------------------


def next_xid(conn: psycopg.Connection[Any]) -> int:
    """The next transaction id: write transactions consume one each, reads none."""
    row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A PostgreSQL server for one test: its transaction counter is cluster-wide, and the
    session's server has other pods writing to it."""
    root = make_state_dir(Path(tempfile.mkdtemp(prefix="threadgate-cost-", dir="/tmp")))
    pg = Postgres(root / "pg", fast=True)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_database_writes_do_not_grow_with_the_reply(
    own_postgres: Postgres, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Chunks go to JetStream only: a run of 2,000 chunks consumes exactly as many write
    transactions as one of 10 (transaction ids are counted exactly and at once, unlike
    pg_stat_database's committed transactions; bench/dbcost.py measures both)."""
    stream, prefix = unique_names()
    env = pod_env(
        database_url=own_postgres.url(),
        nats_url=stack.nats.url,
        stream=stream,
        prefix=prefix,
        heartbeat_s=3600,  # the pod's own periodic writes, out of the windows
        adopt_check_s=3600,
    )
    cluster = Cluster(env, tmp_path_factory.mktemp("pods"), size=1)
    await cluster.start()
    admin = await asyncio.to_thread(psycopg.connect, own_postgres.url("postgres"), autocommit=True)
    try:
        async with cluster.client() as client:

            async def writes(chunks: int) -> int:
                x0 = next_xid(admin)
                thread = unique("cost")
                run = await client.post(
                    thread, "cost", model_options={"chunks": chunks, "delay_ms": 0}
                )
                reply = await client.reply(thread)
                assert reply.status == "success" and reply.text == mock_reply(chunks)
                await wait_run(client, thread, run["run_id"])
                x1 = await steady(admin)
                return x1 - x0

            await writes(3)  # warm
            got = {n: [await writes(n) for _ in range(2)] for n in (10, 2000)}
            print(f"\nwrite transactions per run, by chunks: {got}")
            # Exactly as many for 2,000 chunks as for 10, and for every run alike.
            assert len({w for runs in got.values() for w in runs}) == 1, got
    finally:
        admin.close()
        await cluster.stop()


async def steady(admin: psycopg.Connection[Any], hold_s: float = 1.0) -> int:
    """The transaction counter once it has not moved for `hold_s` (the run's last writes done)."""
    last, since = next_xid(admin), time.monotonic()
    while time.monotonic() - since < hold_s:
        await asyncio.sleep(0.1)  # paces reading the counter
        now = next_xid(admin)
        if now != last:
            last, since = now, time.monotonic()
    return last


# --- stops from another pod, by the control message or by the poll ----------------------

PACED = {"chunks": 200, "delay_ms": 100, "vary": True}  # 20 s of reply, a chunk every 100 ms


@pytest.fixture(scope="module")
async def trio(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    """Three pods for the tests below. Pods 0 and 1 re-read stop flags only every 30 s: a stop
    that lands within a chunk there came by the control message. Pod 2 is deaf: it listens
    on another control subject (it misses every stop message) and polls every 1 s."""
    stream, prefix = unique_names()
    env = pod_env(
        database_url=stack.new_database("mp"),
        nats_url=stack.nats.url,
        stream=stream,
        prefix=prefix,
        stop_poll_s=30,
        tail_linger_s=1,  # an earlier test's tails close soon after their clients leave
    )
    deaf = {"THREADGATE_CONTROL_SUBJECT": f"deaf.{prefix}", "THREADGATE_STOP_POLL_S": "1"}
    cluster = Cluster(env, tmp_path_factory.mktemp("pods"), 3, per_pod={2: deaf})
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


@pytest.fixture
def trio_logs(trio: Cluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The trio, with its pods' logs under a failure's traceback."""
    logs_on_failure(request, trio)
    yield trio


async def cancel_elsewhere(
    cluster: Cluster, executor: Pod, via: Pod
) -> tuple[dict[str, Any], Reply, int]:
    """A paced run executing on `executor`, cancelled through `via` once a client attached to
    `via` holds 3 chunks: (the final run, the client's reply, how many chunks the executor
    stored after the cancel was accepted: counted by JetStream's own store times, so a client
    lagging behind the executor on a busy machine changes nothing)."""
    async with cluster.client([executor]) as on_executor, cluster.client([via]) as on_via:
        for _ in range(5):
            thread = unique()
            run = await on_executor.post(thread, "stop me", model_options=PACED)
            if (await running_on(on_via, cluster, thread, run["run_id"])) is executor:
                break
            # Another pod's queue poll claimed it before the accepting pod did: again.
            await on_via.cancel(thread, run["run_id"], wait=True)
        else:
            raise AssertionError(f"no run started on {executor.name}")
        watcher = Attacher([via.url], thread).start()
        await watcher.wait_chunk(2)
        await on_via.cancel(thread, run["run_id"])
        accepted = time.time()
        reply = await watcher.result(30)
        final = await wait_run(on_via, thread, run["run_id"])
    assert final["status"] == reply.status == "cancelled" and final["output"] == reply.text
    assert final["attempts"] == [
        {"attempt": 1, "executor": executor.name, "kind": "first", "kept": 0}
    ]
    stored = await stored_messages(cluster, thread)
    after = [e for t, e in stored if e["type"] == "chunk" and t.timestamp() > accepted]
    return final, reply, len(after)


async def test_a_cancel_sent_to_another_pod_stops_the_run_within_a_chunk(
    trio_logs: Cluster,
) -> None:
    """The cancel reaches a pod that does not execute the run: the flag goes to PostgreSQL and
    the control message to the executing pod, which stops within a chunk (its poll is 30 s
    away)."""
    executor, via = trio_logs.pods[0], trio_logs.pods[1]
    _, reply, after = await cancel_elsewhere(trio_logs, executor, via)
    assert after <= 1, f"{after} chunks stored after the cancel was accepted"
    assert reply.text == mock_reply(len(reply.chunks), {0: 1})


async def test_a_deaf_pod_still_stops_at_its_poll(trio_logs: Cluster) -> None:
    """The executing pod misses the control message: it reads the flag at its next poll
    (THREADGATE_STOP_POLL_S, 1 s: at most 10 chunks and a couple in flight later)."""
    executor, via = trio_logs.pods[2], trio_logs.pods[1]
    _, reply, after = await cancel_elsewhere(trio_logs, executor, via)
    assert after <= 11, f"{after} chunks stored after the cancel was accepted"
    assert reply.text == mock_reply(len(reply.chunks), {0: 1})


# --- one consumer per thread per pod -------------------------------------------------------


async def thread_consumers(cluster: Cluster, thread: str) -> int:
    """JetStream consumers of the thread's subject on the cluster's stream, as the server
    lists them."""
    env = cluster.env
    subject = f"{env['THREADGATE_SUBJECT_PREFIX']}.thread.{thread}"
    nc = await nats.connect(env["THREADGATE_NATS_URL"])
    try:
        infos = await nc.jetstream().consumers_info(env["THREADGATE_STREAM_NAME"])
    finally:
        await nc.close()
    return sum(1 for i in infos if i.config.filter_subject == subject)


async def gauge(pod: Pod, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{pod.url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not in {pod.name}'s metrics")


async def settled(pod: Pod, name: str, value: float, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (now := await gauge(pod, name)) != value:
        assert loop.time() < deadline, f"{pod.name}: {name} stays at {now}"
        await asyncio.sleep(0.1)  # a gauge has no event to wait on: scrape again


async def test_many_clients_share_one_consumer_per_thread_per_pod(trio_logs: Cluster) -> None:
    pods = trio_logs.pods[:2]
    for pod in pods:
        await settled(pod, "threadgate_thread_tails", 0)  # earlier tests' tails gone
    thread = unique()
    long = {"chunks": 600, "delay_ms": 30}  # 18 s: attached all along, then cancelled
    async with trio_logs.client([pods[0]]) as client:
        run = await client.post(thread, "fan out", model_options=long)
        clients = [Attacher([p.url], thread).start() for p in pods for _ in range(10)]
        for c in clients:
            await c.wait_chunk(2)
        # 20 clients, two pods: two consumers on the server, one tail per pod with 10 readers.
        assert await thread_consumers(trio_logs, thread) == 2
        for pod in pods:
            assert await gauge(pod, "threadgate_active_attachers") == 10
            assert await gauge(pod, "threadgate_thread_tails") == 1
        await client.cancel(thread, run["run_id"])
        replies = [await c.result(30) for c in clients]
    assert {r.status for r in replies} == {"cancelled"}
    assert len({r.text for r in replies}) == 1  # every client read the same events


# --- a NATS outage past THREADGATE_NATS_OUTAGE_LIMIT_S -------------------------------------


async def test_a_nats_outage_past_its_limit_fails_the_attempt_and_the_retry_continues(
    start_cluster: StartCluster, stack: Stack
) -> None:
    """The attempt gives up publishing after THREADGATE_NATS_OUTAGE_LIMIT_S (1 s here) and
    fails as transient; the run waits the outage out and its next attempt continues after
    the chunks stored before it. An outage does not count against THREADGATE_MAX_RETRIES
    (0 here: a model failure would end the run at once)."""
    cluster = await start_cluster(
        size=1, nats_outage_limit_s=1, retry_base_s=3, max_retries=0, mock_delay_ms=50
    )
    pod = cluster.pods[0]
    thread = unique()
    async with cluster.client() as client:
        run = await client.post(thread, "x", model_options={"chunks": 40, "vary": True})
        watcher = Attacher([pod.url], thread, reconnects=50).start()
        await watcher.wait_chunk(10)
        stack.nats.stop()
        try:
            await wait_logged(pod, "attempt failed, next in 3.0s")  # past the limit
        finally:
            stack.nats.start()  # back before the retry, 3 s later
        final = await wait_run(client, thread, run["run_id"], timeout=60)
        reply = await watcher.result(30)
    assert final["status"] == "success"
    assert [a["kind"] for a in final["attempts"]] == ["first", "retry"]
    kept = final["attempts"][1]["resume_from"]
    assert kept >= 10
    stored = mock_reply(40, {0: 1, kept: 2})
    assert final["output"] == reply.text == stored
    assert (reply.resets, reply.resumes, reply.duplicates) == (0, 1, 0)
    assert "StreamUnavailable" in pod.log_text()


# --- retry backoff, timeouts, exhausted retries ---------------------------------------------


def test_the_documented_backoff_defaults() -> None:
    """README: 1 s doubling to the 30 s cap, 5 retries (the settings' defaults, whatever the
    environment says)."""
    fields = Settings.model_fields
    defaults = {k: fields[k].default for k in ("retry_base_s", "retry_cap_s", "max_retries")}
    assert defaults == {"retry_base_s": 1.0, "retry_cap_s": 30.0, "max_retries": 5}
    deps = SimpleNamespace(settings=SimpleNamespace(**defaults))
    assert [backoff(deps, n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


@pytest.fixture(scope="module")
async def solo(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    """One pod with a quick backoff (0.1 s doubling to 0.4 s) and a 4 s run time budget."""
    stream, prefix = unique_names()
    env = pod_env(
        database_url=stack.new_database("mp"),
        nats_url=stack.nats.url,
        stream=stream,
        prefix=prefix,
        retry_base_s=0.1,
        retry_cap_s=0.4,
        max_retries=5,
        run_timeout_s=4,
        mock_delay_ms=50,
    )
    cluster = Cluster(env, tmp_path_factory.mktemp("pods"), 1)
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


@pytest.fixture
def solo_logs(solo: Cluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    logs_on_failure(request, solo)
    yield solo


async def assert_stored_as_seen(
    client: AsyncClient, thread: str, run_id: str, reply: Reply
) -> None:
    """What a client saw of a run that failed is what is stored for it (contract v3): its
    partial reply, or no reply when it saw none."""
    messages = [m for m in await client.messages(thread) if m["run_id"] == run_id]
    if not reply.text:
        assert [m["role"] for m in messages] == ["user"]
    else:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["content"] == reply.text and messages[1]["status"] == "error"


async def test_retries_back_off_doubling_to_the_cap_then_end_the_run(solo_logs: Cluster) -> None:
    pod = solo_logs.pods[0]
    thread = unique()
    async with solo_logs.client() as client:
        options = {"chunks": 3, "fail": "transient", "fail_at": 1, "vary": True}
        run = await client.post(thread, "flaky", model_options=options)
        reply = await client.reply(thread)
        final = await wait_run(client, thread, run["run_id"])
        await assert_stored_as_seen(client, thread, run["run_id"], reply)
    assert reply.status == final["status"] == "error"
    assert reply.error == final["error"]
    assert final["error"]["code"] == "retries_exhausted"
    assert [a["kind"] for a in final["attempts"]] == ["first"] + ["retry"] * 5
    records = [r for r in pod.log_records() if r.get("run_id") == run["run_id"]]
    failed = [r for r in records if r["msg"].startswith("attempt failed, next in")]
    delays = [float(r["msg"].split("next in ")[1].split("s:")[0]) for r in failed]
    assert delays == [0.1, 0.2, 0.4, 0.4, 0.4]  # doubling from the base, then the cap
    retried = [r for r in records if r["msg"] == "run attempt retried"]
    assert len(retried) == 5
    for fail, nxt, delay in zip(failed, retried, delays, strict=True):
        # Each retry began only after its delay (a busy machine only makes it later).
        assert (at(nxt["ts"]) - at(fail["ts"])).total_seconds() >= delay - 0.01


async def test_a_run_past_its_time_budget_ends_timeout(solo_logs: Cluster) -> None:
    """THREADGATE_RUN_TIMEOUT_S (4 s) ends a 10 s reply: error `timeout`, the chunks
    streamed so far are not stored."""
    thread = unique()
    async with solo_logs.client() as client:
        run = await client.post(thread, "long", model_options={"chunks": 200, "vary": True})
        reply = await client.reply(thread)
        final = await wait_run(client, thread, run["run_id"])
        await assert_stored_as_seen(client, thread, run["run_id"], reply)
        nxt = await client.post(thread, "next", model_options={"chunks": 2})
        assert (await wait_run(client, thread, nxt["run_id"]))["status"] == "success"
    assert 0 < len(reply.chunks) < 200
    assert reply.status == final["status"] == "error" and final["output"] == reply.text
    assert (
        reply.error
        == final["error"]
        == {
            "code": "timeout",
            "message": "the run exceeded 4s",
        }
    )


async def test_the_time_budget_spans_a_crash(solo_logs: Cluster) -> None:
    """The budget runs from the run's first start, crashes included: a pod that comes back
    after it has passed ends the run `timeout` at once, without calling the model again
    (a fresh budget per attempt would have let the 2.5 s reply finish)."""
    pod = solo_logs.pods[0]
    thread = unique()
    async with solo_logs.client() as client:
        run = await client.post(thread, "x", model_options={"chunks": 50, "vary": True})
        watcher = Attacher([pod.url], thread, reconnects=100).start()
        await watcher.wait_chunk(5)
        started = at((await client.run(thread, run["run_id"]))["started_at"])
        await pod.kill()
        # The pod stays down until the budget has passed (the outage is the scenario).
        await asyncio.sleep(max(0.0, started.timestamp() + 4 + 0.2 - time.time()))
        await pod.restart()
        final = await wait_run(client, thread, run["run_id"], timeout=60)
        reply = await watcher.result(30)
        await assert_stored_as_seen(client, thread, run["run_id"], reply)
    assert final["status"] == "error" and final["error"]["code"] == "timeout"
    kept = len(reply.chunks)
    assert final["attempts"] == [
        {"attempt": 1, "executor": pod.name, "kind": "first", "kept": 0},
        {"attempt": 2, "executor": pod.name, "kind": "replay", "kept": kept, "resume_from": kept},
    ]
    assert reply.status == "error" and reply.error == final["error"]
    # Attempt 2 only ended the run, keeping what attempt 1 streamed: the model was not
    # called again (its run_started says so: no chunk of attempt 2).
    assert [e.data["attempt"] for e in watcher.events if e.event == "run_started"] == [1, 2]
    assert not [e for e in watcher.events if e.event == "chunk" and e.data["attempt"] == 2]
    assert reply.text == mock_reply(len(reply.chunks), {0: 1})
