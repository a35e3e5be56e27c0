"""Faults beyond a pod's death: NATS and PostgreSQL restarts, departed names, app versions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import nats
import pytest
from nats.js.api import DeliverPolicy
from threadgate.client import AsyncClient
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unique
from tests.multipod.cluster import Attacher, Cluster, Pod, at, metric, running_on, wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod


async def assert_one_reply(client: AsyncClient, thread: str, run_id: str, stored: str) -> None:
    """The conversation holds the run's user message and exactly one assistant message."""
    messages = [m for m in await client.messages(thread) if m["run_id"] == run_id]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", messages[0]["content"]),
        ("assistant", stored),
    ]


def continued(run: dict[str, Any]) -> dict[int, int]:
    """Which attempt wrote which chunks of a `vary` reply: {first index: attempt}, from the
    run's attempts (a continued attempt starts at its resume_from, a regenerated one at 0)."""
    starts = {0: 1}
    for a in run["attempts"][1:]:
        starts[a.get("resume_from") or 0] = a["attempt"]
    return starts


async def stored_events(cluster: Cluster, thread: str) -> list[dict[str, Any]]:
    """Every message JetStream holds on the thread's subject, read by a consumer of our own:
    as many as the stream's own count for the subject says."""
    env = cluster.env
    stream = env["THREADGATE_STREAM_NAME"]
    subject = f"{env['THREADGATE_SUBJECT_PREFIX']}.thread.{thread}"
    nc = await nats.connect(env["THREADGATE_NATS_URL"])
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream, subjects_filter=subject)
        count = (info.state.subjects or {}).get(subject, 0)
        sub = await js.subscribe(
            subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        try:
            return [json.loads((await sub.next_msg(timeout=10)).data) for _ in range(count)]
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


async def readyz(url: str) -> str:
    """The pod's readiness: `ready`, `degraded` (a dependency is away), `not_ready`, or
    `down` when nothing answers within the readiness probe's 3 s (k8s/base: timeoutSeconds).
    During a PostgreSQL outage the pod's own ping waits 2 s: a 2 s client timeout raced it
    and saw `down` instead of `degraded` (seen once)."""
    async with httpx.AsyncClient(timeout=3) as http:
        try:
            return str((await http.get(f"{url}/readyz")).json()["status"])
        except httpx.TransportError:
            return "down"


async def wait_readyz(url: str, status: str, timeout: float = 30) -> float:
    """Poll /readyz until it reports `status`; seconds it took."""
    t0 = time.monotonic()
    async with asyncio.timeout(timeout):
        while await readyz(url) != status:  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.05)
    return time.monotonic() - t0


@pytest.mark.long
async def test_nats_restart_mid_reply(start_cluster: StartCluster, stack: Stack) -> None:
    """nats-server stops and starts mid-reply, for less than THREADGATE_NATS_OUTAGE_LIMIT_S
    (30 s): the attempt waits the outage out (its publishes are retried under the same
    message ids, and JetStream drops what it already stored), so the run keeps attempt 1, no
    client gets a `reset` and every client gets each chunk once. The pods' tails resubscribe:
    the clients attached to them never reconnect. A chunk every 2 ms, so that publishes are in
    flight when the server stops (a 0.2 s publish timeout: the outage outlasts it, so they are
    sent again, which the executor counts).

    The subject itself may hold a chunk twice, and that is the publisher's repair, not a
    duplicate: the messages written to the socket as the server stopped are lost, while the
    next one, still in nats-py's buffer, is sent first on reconnect; the lost ones, published
    again, are stored after it, and so it is stored once more, under a new id, after them
    (app/streams/publisher.py). Readers take only the next index, so its first copy is skipped
    as the far side of a gap. Read that way, the subject holds each chunk once, and every copy
    skipped is an index ahead (never one already taken) and one repair the executor logged."""
    chunks = 1500
    cluster = await start_cluster(size=2, mock_delay_ms=40, publish_timeout_s=0.2)
    client = cluster.client()
    thread = unique()
    options = {"chunks": chunks, "vary": True, "delay_ms": 2}
    run = await client.post(thread, "through a NATS restart", model_options=options)
    executor = await running_on(client, cluster, thread, run["run_id"])
    attachers = [Attacher([p.url], thread).start() for p in cluster.pods]
    await attachers[0].wait_chunk(300)
    stack.nats.stop()
    await wait_readyz(cluster.pods[0].url, "degraded")
    stack.nats.start()
    back = time.monotonic()

    final = await wait_run(client, thread, run["run_id"], timeout=60)
    stored = mock_reply(chunks, {0: 1})
    assert final["status"] == "success" and final["output"] == stored
    assert final["attempts"] == [
        {"attempt": 1, "executor": final["executor"], "kind": "first", "kept": 0}
    ]
    for a in attachers:
        reply = await a.result(60)
        assert reply.status == "success" and reply.text == stored
        assert (reply.resets, reply.resumes, reply.duplicates) == (0, 0, 0)
        assert "reset" not in [e.event for e in a.events]
    # The outage caught publishes: the executor sent some again.
    assert await metric(executor, "threadgate_publish_retries_total") > 0
    events = await stored_events(cluster, thread)
    assert [e["type"] for e in events if e["type"] != "chunk"] == ["run_started", "done"]
    assert events[0]["type"] == "run_started" and events[-1]["type"] == "done"
    taken, ahead = read_in_order([e for e in events if e["type"] == "chunk"])
    assert [e["index"] for e in taken] == list(range(chunks))
    assert "".join(e["text"] for e in taken) == stored
    repairs = executor.log_text().count("stored out of order")
    assert len(ahead) == repairs, (ahead, repairs)
    await assert_one_reply(client, thread, run["run_id"], stored)
    # How long after NATS was back the first chunk reached a client (none can arrive while it
    # is down). Generous: the attempt itself would give up at the 30 s outage limit.
    first = attachers[0]
    flowing = next(
        t - back
        for e, t in zip(first.events, first.arrived, strict=True)
        if e.event == "chunk" and t >= back
    )
    assert flowing < 30
    print(f"\nNATS back → chunks flowing again at an attacher: {flowing:.2f}s; repairs {repairs}")


def read_in_order(
    chunks: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A subject's chunks as readers take them (only the next index) and the copies they
    skip, each of which must be ahead of the next index: one behind would be a duplicate."""
    taken: list[dict[str, Any]] = []
    ahead: list[dict[str, Any]] = []
    for e in chunks:
        if e["index"] == len(taken):
            taken.append(e)
        else:
            assert e["index"] > len(taken), f"chunk {e['index']} stored again after it was taken"
            ahead.append(e)
    return taken, ahead


async def test_postgres_restart_mid_reply(start_cluster: StartCluster, stack: Stack) -> None:
    """PostgreSQL goes away mid-reply and stays away until the reply's last chunk is out.
    Chunks go to JetStream only: the reply step keeps streaming to the client through the
    outage. Its end waits for the database: DBOS checkpoints the step before it begins the
    finish step, and retries that checkpoint until PostgreSQL answers, so the finish step
    itself never meets the outage (it begins once the database is back; its own retry is for
    an outage that begins inside it). The pods take their fencing claims again, and the run
    ends in its first attempt: no `reset`, no second attempt."""
    chunks = 40
    cluster = await start_cluster(size=2, mock_delay_ms=40)
    client = cluster.client()
    thread = unique()
    options = {"chunks": chunks, "vary": True}
    run = await client.post(thread, "through a Postgres restart", model_options=options)
    executor = await running_on(client, cluster, thread, run["run_id"])
    other = cluster.others(executor.name)[0]
    attacher = Attacher([other.url], thread).start()  # no reconnect: the stream must hold
    await attacher.wait_chunk(5)
    stack.pg.stop()
    try:
        await wait_readyz(executor.url, "degraded")
        await attacher.wait_chunk(chunks - 1)  # the whole reply, with the database away
        last_chunk = time.time()
        # The reply step waits to store the reply (it ends the step: done comes after).
        await wait_logged(executor, "storing the reply failed, retrying")
    finally:
        stack.pg.start()
    took = await wait_readyz(executor.url, "ready", timeout=60)
    await wait_readyz(other.url, "ready", timeout=60)

    final = await wait_run(client, thread, run["run_id"], timeout=60)
    stored = mock_reply(chunks, {0: 1})
    assert final["status"] == "success" and final["output"] == stored
    assert final["attempts"] == [
        {"attempt": 1, "executor": executor.name, "kind": "first", "kept": 0}
    ]
    assert at(final["finished_at"]).timestamp() > last_chunk  # finished after the outage
    reply = await attacher.result(60)
    assert reply.status == "success" and reply.text == stored
    assert (reply.resets, reply.resumes, reply.duplicates) == (0, 0, 0)
    await assert_one_reply(client, thread, run["run_id"], stored)
    for pod in cluster.pods:
        # The claim's connection died with the server; the watcher took the claim back.
        await wait_logged(pod, "executor claim re-acquired")
        assert "executor claim taken by" not in pod.log_text()
    # The thread goes on afterwards.
    nxt = await client.post(thread, "after", model_options={"chunks": 3})
    assert (await client.reply(thread)).run_id == nxt["run_id"]
    print(f"\nPostgreSQL back → /readyz green: {took:.2f}s")


async def wait_logged(pod: Pod, text: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while text not in pod.log_text():
        assert loop.time() < deadline, f"{pod.name} never logged {text!r}"
        await asyncio.sleep(0.05)  # paces reading another process's log


@pytest.mark.cluster(size=3, adopt_after_s=2, adopt_check_s=0.5, heartbeat_s=0.5, mock_delay_ms=30)
async def test_departed_name_is_adopted_once(cluster: Cluster) -> None:
    client = cluster.client()
    thread = unique()
    run = await client.post(thread, "orphan me", model_options={"chunks": 40, "vary": True})
    victim = await running_on(client, cluster, thread, run["run_id"])
    attacher = Attacher([p.url for p in cluster.others(victim.name)], thread).start()
    await attacher.wait_chunk(3)
    survivors = AsyncClient([p.url for p in cluster.others(victim.name)])
    queued = await survivors.post(thread, "next", model_options={"chunks": 2})
    await victim.kill()  # and it never comes back (scale-down)
    t0 = time.monotonic()
    final = await wait_run(survivors, thread, run["run_id"], timeout=60)
    took = time.monotonic() - t0
    assert final["status"] == "success"
    assert final["executor"] != victim.name and final["attempt"] == 2
    adopted = final["attempts"][1]
    assert adopted["kind"] == "replay" and adopted["resume_from"] >= 3  # it continues
    stored = mock_reply(40, continued(final))
    assert final["output"] == stored
    reply = await attacher.result(30)
    assert reply.text == stored and reply.resets == 0 and reply.duplicates == 0
    await assert_one_reply(survivors, thread, run["run_id"], stored)
    second = await wait_run(survivors, thread, queued["run_id"], timeout=30)
    assert second["status"] == "success"
    adoptions = sum(p.log_text().count("adopted 1 runs of departed pod") for p in cluster.pods)
    assert adoptions == 1
    print(f"\nkill → departed run finished by a survivor: {took:.2f}s (adopt_after_s=2)")


@pytest.mark.cluster(size=2, adopt_after_s=1, adopt_check_s=0.3, heartbeat_s=0.3, mock_delay_ms=30)
async def test_a_live_but_silent_name_is_never_adopted(cluster: Cluster) -> None:
    client = cluster.client()
    thread = unique()
    run = await client.post(thread, "frozen", model_options={"chunks": 30, "vary": True})
    victim = await running_on(client, cluster, thread, run["run_id"])
    other = cluster.others(victim.name)[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGSTOP)  # heartbeat stops; its claim (a live connection) stays
    try:
        deadline = time.monotonic() + 4  # many adoption checks past adopt_after_s
        async with AsyncClient(other.url) as c:
            while time.monotonic() < deadline:
                current = await c.run(thread, run["run_id"])
                assert current["executor"] == victim.name and current["attempt"] == 1
                await asyncio.sleep(0.2)
        assert "adopted" not in other.log_text()
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    final = await wait_run(client, thread, run["run_id"], timeout=60)
    assert final["status"] == "success" and final["attempt"] == 1
    await assert_one_reply(client, thread, run["run_id"], mock_reply(30, {0: 1}))


async def test_stranded_version_is_reported_and_adopted(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(size=1, app_version="1.0.0", mock_delay_ms=30, auto_adopt="false")
    pod = cluster.pods[0]
    client = cluster.client()
    thread = unique()
    run = await client.post(thread, "deploy me", model_options={"chunks": 30, "vary": True})
    await running_on(client, cluster, thread, run["run_id"])
    await pod.kill()
    await pod.restart({"THREADGATE_APP_VERSION": "1.1.0"})
    assert "belong to an application version no live pod runs" in pod.log_text()
    async with httpx.AsyncClient(base_url=pod.url) as http:
        listing = (await http.get("/admin/stranded")).json()
        assert [r["run_id"] for r in listing["runs"]] == [run["run_id"]]
        assert listing["runs"][0]["compatible"] is True
        metrics = (await http.get("/metrics")).text
        assert "threadgate_stranded_runs 1.0" in metrics
    still = await client.run(thread, run["run_id"])
    assert still["status"] == "running" and still["attempt"] == 1
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "threadgate.cli", "adopt", "--url", pod.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "adopted 1" in out.stdout
    final = await wait_run(client, thread, run["run_id"], timeout=60)
    assert final["status"] == "success" and final["attempt"] == 2
    assert final["attempts"][1]["kind"] == "replay"
    await assert_one_reply(client, thread, run["run_id"], mock_reply(30, continued(final)))


async def test_an_attach_during_a_nats_outage_waits_the_limit_then_503(
    start_cluster: StartCluster, stack: Stack
) -> None:
    """A client attaching while nats-server is away (its thread has no tail on the pod yet)
    is held for THREADGATE_NATS_OUTAGE_LIMIT_S (3 s here), then answered 503 with a JSON
    error: never a hang, never an empty 200."""
    cluster = await start_cluster(size=1, nats_outage_limit_s=3)
    pod = cluster.pods[0]
    thread = unique()
    async with cluster.client() as client:
        run = await client.post(thread, "before", model_options={"chunks": 2})
        await wait_run(client, thread, run["run_id"])
    stack.nats.stop()
    try:
        await wait_readyz(pod.url, "degraded")
        async with httpx.AsyncClient(timeout=60) as http:
            t0 = time.monotonic()
            resp = await http.get(f"{pod.url}/threads/{thread}/attach")
            took = time.monotonic() - t0
    finally:
        stack.nats.start()
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"]
    assert took >= 3 - 0.2, took  # it waited the outage limit before answering
    print(f"\nattach during the outage answered 503 after {took:.1f}s (limit 3 s)")


async def test_a_run_whose_budget_runs_out_during_a_nats_outage_ends_timeout(
    start_cluster: StartCluster, stack: Stack
) -> None:
    """THREADGATE_RUN_TIMEOUT_S (4 s) passes while nats-server is away (6 s): the run does not
    wait the outage out past its budget, nor end `error/internal`; once NATS is back it ends
    `error/timeout`, with its `done`, and the thread takes the next run."""
    cluster = await start_cluster(size=1, run_timeout_s=4, nats_outage_limit_s=2, mock_delay_ms=50)
    pod = cluster.pods[0]
    thread = unique()
    async with cluster.client() as client:
        run = await client.post(thread, "long", model_options={"chunks": 400, "vary": True})
        watcher = Attacher([pod.url], thread, reconnects=100).start()
        await watcher.wait_chunk(3)
        stack.nats.stop()
        try:
            await wait_run(
                client,
                thread,
                run["run_id"],
                lambda r: at(r["started_at"]).timestamp() + 6 < time.time(),
            )  # the budget has passed, NATS still away
        finally:
            stack.nats.start()
        final = await wait_run(client, thread, run["run_id"], timeout=60)
        assert final["status"] == "error", final
        assert final["error"]["code"] == "timeout", final
        reply = await watcher.result(60)
        assert reply.status == "error" and reply.error == final["error"]
        nxt = await client.post(thread, "next", model_options={"chunks": 2})
        assert (await wait_run(client, thread, nxt["run_id"]))["status"] == "success"


async def test_a_request_during_a_postgres_outage_is_503_not_500(
    start_cluster: StartCluster, stack: Stack
) -> None:
    """PostgreSQL away: a request that needs it waits THREADGATE_DB_POOL_TIMEOUT_S (1 s here),
    then is answered 503 `unavailable` (retry, here or elsewhere), never 500 `internal`."""
    cluster = await start_cluster(size=1, db_pool_timeout_s=1)
    pod = cluster.pods[0]
    stack.pg.stop()
    try:
        async with httpx.AsyncClient(base_url=pod.url, timeout=30) as http:
            listed = await http.get(f"/threads/{unique()}/runs")
            posted = await http.post(f"/threads/{unique()}/runs", json={"input": "x"})
    finally:
        stack.pg.start()
    for resp in (listed, posted):
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "unavailable"
