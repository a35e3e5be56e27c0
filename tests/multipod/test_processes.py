"""A pod of several executing processes (THREADGATE_PROCESSES, app/pod.py): one API port,
an executor id per process, the pod's probes and metrics; a killed process comes back under
its name and its runs continue; SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import httpx
import pytest
from threadgate.devstack import free_port
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import Attacher, Cluster, wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod

CHUNKS = 40
LONG = {"chunks": CHUNKS, "delay_ms": 50, "vary": True}


async def one_pod(start_cluster: StartCluster, **knobs: Any) -> tuple[Cluster, str]:
    """A cluster of one pod of two processes; the pod's admin URL."""
    admin = free_port()
    cluster = await start_cluster(
        size=1, per_pod={0: {"THREADGATE_METRICS_PORT": str(admin)}}, processes=2, **knobs
    )
    url = f"http://127.0.0.1:{admin}"
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(600):  # both processes ready (the pod is ready with one)
            resp = await http.get(f"{url}/readyz")
            if resp.status_code == 200 and resp.json()["ready"] == 2:
                break
            await asyncio.sleep(0.05)  # paces polling the pod's own readiness
        else:
            raise TimeoutError(f"the pod's processes never were both ready: {resp.text}")
    return cluster, url


async def runs_on_both(
    cluster: Cluster, options: dict[str, Any]
) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """Runs posted (fresh connections each round: the kernel spreads connections, not
    requests) until both processes execute some; all runs, and those of each executor."""
    names = {cluster.pods[0].name, f"{cluster.pods[0].name}-1"}
    posted: list[tuple[str, str]] = []
    by_exec: dict[str, list[tuple[str, str]]] = {}
    for _ in range(10):
        async with cluster.client() as client:
            threads = [unique() for _ in range(4)]
            runs = await asyncio.gather(
                *(client.post(t, "go", model_options=options) for t in threads)
            )
            for t, r in zip(threads, runs, strict=True):
                posted.append((t, r["run_id"]))
                for _ in range(400):
                    got = await client.run(t, r["run_id"])
                    if got["executor"]:
                        by_exec.setdefault(got["executor"], []).append((t, r["run_id"]))
                        break
                    await asyncio.sleep(0.02)  # paces polling the run's row
        if set(by_exec) == names:
            return posted, by_exec
    raise AssertionError(f"runs never reached both processes: {by_exec}")


async def processes(admin: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        doc: dict[str, Any] = (await http.get(f"{admin}/readyz")).json()["processes"]
        return doc


async def test_a_pod_of_two_processes_runs_on_both(start_cluster: StartCluster) -> None:
    cluster, admin = await one_pod(start_cluster)
    pod = cluster.pods[0]
    names = {pod.name, f"{pod.name}-1"}
    assert set(await processes(admin)) == names
    executors: set[str] = set()
    for _ in range(20):
        # New connections each round (a kept-alive one stays with its process): the kernel
        # hands each to whichever process accepts first.
        async with cluster.client() as client:
            threads = [unique() for _ in range(8)]
            runs = await asyncio.gather(
                *(client.post(t, "hi", model_options={"chunks": 3}) for t in threads)
            )
            for t, r in zip(threads, runs, strict=True):
                final = await wait_run(client, t, r["run_id"])
                assert final["status"] == "success" and final["output"] == mock_reply(3)
                executors.add(final["executor"])
        if executors == names:
            break
    assert executors == names
    async with httpx.AsyncClient(timeout=5) as http:
        health = await http.get(f"{admin}/healthz")
        assert health.status_code == 200, health.text
        text = (await http.get(f"{admin}/metrics")).text
    for name in names:
        assert f'threadgate_runs_finished_total{{executor="{name}",status="success"}}' in text or (
            f'executor="{name}"' in text
        )
    assert text.count("# TYPE threadgate_pod_processes_ready gauge") == 1
    assert "threadgate_pod_processes_ready 2" in text


async def test_a_killed_process_comes_back_and_its_runs_continue(
    start_cluster: StartCluster,
) -> None:
    """SIGKILL one process of the pod mid-reply: the pod's supervisor starts it again under
    its name, which recovers the run and continues it; the other process never stopped."""
    cluster, admin = await one_pod(start_cluster)
    pod = cluster.pods[0]
    posted, by_exec = await runs_on_both(cluster, LONG)
    async with cluster.client() as client:
        victim_name = next(iter(sorted(by_exec)))
        victims = by_exec[victim_name]
        watcher = Attacher([pod.url], victims[0][0], reconnects=20).start()
        await watcher.wait_chunk(8)
        pid = (await processes(admin))[victim_name]["pid"]
        os.kill(pid, signal.SIGKILL)
        finals = [await wait_run(client, t, r) for t, r in posted]
        assert all(f["status"] == "success" for f in finals)
        for _, run_id in victims:
            run = next(f for f in finals if f["run_id"] == run_id)
            # Recovered when its process came back under its name (DBOS re-enqueues: either
            # process may continue it).
            assert run["attempt"] == 2 and run["executor"] in by_exec.keys() | {victim_name}
            resume_from = run["attempts"][1]["resume_from"]
            assert resume_from and resume_from >= 1
            assert run["output"] == mock_reply(CHUNKS, {0: 1, resume_from: 2})
        for name, rs in by_exec.items():
            if name != victim_name:  # the other process's runs never stopped
                for _, run_id in rs:
                    run = next(f for f in finals if f["run_id"] == run_id)
                    assert run["attempt"] == 1 and run["output"] == mock_reply(CHUNKS, {0: 1})
        reply = await watcher.result()
        victim_run = next(f for f in finals if f["run_id"] == victims[0][1])
        assert reply.text == victim_run["output"] and reply.duplicates == 0
    after = await processes(admin)
    assert after[victim_name]["pid"] not in (None, pid)
    assert pod.alive  # the pod itself never went down


async def test_sigterm_drains_every_process_of_the_pod(start_cluster: StartCluster) -> None:
    """SIGTERM to the pod: it is no longer ready, every process lets its runs finish (no
    replay), and the pod exits 0 once all of them have."""
    cluster, admin = await one_pod(start_cluster, drain_timeout_s=30)
    pod = cluster.pods[0]
    posted, by_exec = await runs_on_both(cluster, {"chunks": 80, "delay_ms": 50})
    async with cluster.client() as client:
        running = {
            name
            for name, rs in by_exec.items()
            for t, run_id in rs
            if (await client.run(t, run_id))["status"] == "running"
        }
        assert running == set(by_exec), "runs in flight on both processes as the pod is told"
        pod.send_term()
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(200):
                resp = await http.get(f"{admin}/readyz")
                if resp.status_code == 503:
                    break
                await asyncio.sleep(0.02)  # paces polling the pod's readiness
            assert resp.status_code == 503 and resp.json()["status"] == "draining"
        assert await pod.wait_exit(60) == 0
    # Read the runs from a pod of the same database: this one is gone.
    await pod.restart()
    async with cluster.client() as client:
        for t, run_id in posted:
            final = await wait_run(client, t, run_id)
            assert final["status"] == "success" and final["attempt"] == 1
            assert final["output"] == mock_reply(80)
