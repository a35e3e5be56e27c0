"""Faults beyond a pod's death: NATS and PostgreSQL restarts, departed names, app versions."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from threadgate.client import AsyncClient
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unique
from tests.multipod.cluster import Attacher, Cluster, running_on, wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod


async def assert_one_reply(client: AsyncClient, thread: str, run_id: str, chunks: int) -> None:
    messages = [m for m in await client.messages(thread) if m["run_id"] == run_id]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", messages[0]["content"]),
        ("assistant", mock_reply(chunks)),
    ]


async def readyz(url: str) -> str:
    """The pod's readiness: `ready`, `degraded` (a dependency is away), `not_ready`, or
    `down` when nothing answers."""
    async with httpx.AsyncClient(timeout=2) as http:
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


async def test_nats_restart_mid_reply(start_cluster: StartCluster, stack: Stack) -> None:
    cluster = await start_cluster(size=2, mock_delay_ms=40)
    client = cluster.client()
    thread = unique()
    run = await client.post(thread, "through a NATS restart", model_options={"chunks": 60})
    # Attached on both pods; neither client reconnects: the pods' tails must resubscribe.
    attachers = [Attacher([p.url], thread).start() for p in cluster.pods]
    await attachers[0].wait_chunk(10)
    stack.nats.stop()
    await wait_readyz(cluster.pods[0].url, "degraded")
    stack.nats.start()
    back = time.monotonic()
    seen = len(attachers[0].reply.chunks)
    await attachers[0].wait_for(
        lambda e: (
            (e.event == "chunk" and len(attachers[0].reply.chunks) > seen) or e.event == "reset"
        )
    )
    flowing = time.monotonic() - back
    for a in attachers:
        reply = await a.result(60)
        assert reply.status == "success"
        assert reply.text == mock_reply(60)
    final = await wait_run(client, thread, run["run_id"])
    assert final["status"] == "success"
    await assert_one_reply(client, thread, run["run_id"], 60)
    print(f"\nNATS back → chunks flowing again at an attacher: {flowing:.2f}s")


async def test_postgres_restart_mid_reply(start_cluster: StartCluster, stack: Stack) -> None:
    cluster = await start_cluster(size=2, mock_delay_ms=40)
    client = cluster.client()
    thread = unique()
    run = await client.post(thread, "through a Postgres restart", model_options={"chunks": 60})
    attacher = Attacher(cluster.urls, thread, reconnects=5).start()
    await attacher.wait_chunk(5)
    stack.pg.stop()
    await wait_readyz(cluster.pods[0].url, "degraded")
    stack.pg.start()
    took = await wait_readyz(cluster.pods[0].url, "ready", timeout=60)
    await wait_readyz(cluster.pods[1].url, "ready", timeout=60)
    reply = await attacher.result(90)
    assert reply.status == "success" and reply.text == mock_reply(60)
    final = await wait_run(client, thread, run["run_id"], timeout=60)
    assert final["status"] == "success"
    await assert_one_reply(client, thread, run["run_id"], 60)
    # The thread goes on afterwards.
    nxt = await client.post(thread, "after", model_options={"chunks": 3})
    assert (await client.reply(thread)).run_id == nxt["run_id"]
    print(f"\nPostgreSQL back → /readyz green: {took:.2f}s")


@pytest.mark.cluster(size=3, adopt_after_s=2, adopt_check_s=0.5, heartbeat_s=0.5, mock_delay_ms=30)
async def test_departed_name_is_adopted_once(cluster: Cluster) -> None:
    client = cluster.client()
    thread = unique()
    run = await client.post(thread, "orphan me", model_options={"chunks": 40})
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
    reply = await attacher.result(30)
    assert reply.text == mock_reply(40)
    await assert_one_reply(survivors, thread, run["run_id"], 40)
    second = await wait_run(survivors, thread, queued["run_id"], timeout=30)
    assert second["status"] == "success"
    adoptions = sum(p.log_text().count("adopted 1 runs of departed pod") for p in cluster.pods)
    assert adoptions == 1
    print(f"\nkill → departed run finished by a survivor: {took:.2f}s (adopt_after_s=2)")


@pytest.mark.cluster(size=2, adopt_after_s=1, adopt_check_s=0.3, heartbeat_s=0.3, mock_delay_ms=30)
async def test_a_live_but_silent_name_is_never_adopted(cluster: Cluster) -> None:
    client = cluster.client()
    thread = unique()
    run = await client.post(thread, "frozen", model_options={"chunks": 30})
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
    await assert_one_reply(client, thread, run["run_id"], 30)


async def test_stranded_version_is_reported_and_adopted(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(size=1, app_version="1.0.0", mock_delay_ms=30, auto_adopt="false")
    pod = cluster.pods[0]
    client = cluster.client()
    thread = unique()
    run = await client.post(thread, "deploy me", model_options={"chunks": 30})
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
    await assert_one_reply(client, thread, run["run_id"], 30)
