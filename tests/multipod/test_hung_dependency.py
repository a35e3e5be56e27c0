"""A hung dependency never empties the Service: /readyz answers within the probe's timeout.

PostgreSQL and nats-server of their own (real processes), frozen with SIGSTOP: their sockets
stay open and swallow every request, which is what a hung or black-holed server looks like to
a client. A pod's /readyz checks each dependency concurrently, bounded by
THREADGATE_READINESS_CHECK_TIMEOUT_S, and reports the frozen one `degraded` (200: readiness
never gates on a shared dependency, docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from threadgate.devstack import NatsServer, Postgres
from threadgate.store.db import Database

from tests.conftest import unique
from tests.multipod.cluster import Cluster, pod_env, unique_names, wait_run

pytestmark = pytest.mark.multipod

CHECK_TIMEOUT_S = 1.0  # THREADGATE_READINESS_CHECK_TIMEOUT_S of the pod
PROBE_TIMEOUT_S = 3.0  # the readiness probe's timeoutSeconds in k8s/base/statefulset.yaml
PROBES = 3  # several probes in a row: a hung check must not pile up behind the next


@pytest.fixture
def own_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Postgres, NatsServer]]:
    # Under /tmp itself: PostgreSQL's unprivileged account must reach the data directory.
    root = tmp_path_factory.mktemp("frozen")
    pg = Postgres(root / "pg", fast=True)
    nats = NatsServer(root / "nats", max_file_store=512 * 1024**2)
    pg.start()
    nats.start()
    try:
        yield pg, nats
    finally:
        for server in (pg, nats):
            if server.proc is not None and server.proc.poll() is None:
                for pid in processes(server):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
        nats.stop()
        pg.stop()


def processes(server: Postgres | NatsServer) -> list[int]:
    """The server's process and its children: PostgreSQL's backends, each in a session of
    its own (setsid), so its process group alone would leave them running."""
    assert server.proc is not None
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


@contextlib.contextmanager
def frozen(*servers: Postgres | NatsServer) -> Iterator[None]:
    """SIGSTOP every process of each server (the postmaster first: it forks no new backend)."""
    pids = [pid for server in servers for pid in processes(server)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def readyz(url: str) -> tuple[float, int, dict[str, Any]]:
    """One probe as a kubelet makes it: its timeout is the probe's."""
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as http:
        started = time.monotonic()
        resp = await http.get(f"{url}/readyz")
        return time.monotonic() - started, resp.status_code, resp.json()


async def test_readyz_answers_in_time_with_the_frozen_dependency_degraded(
    own_servers: tuple[Postgres, NatsServer], tmp_path: Path
) -> None:
    pg, nats = own_servers
    stream, prefix = unique_names()
    env = pod_env(
        database_url=pg.url("threadgate"),
        nats_url=nats.url,
        stream=stream,
        prefix=prefix,
        readiness_check_timeout_s=CHECK_TIMEOUT_S,
    )
    cluster = Cluster(env, tmp_path, size=1)
    await cluster.start()
    pod = cluster.pods[0]
    try:
        async with cluster.client() as client:
            thread = unique()
            run = await client.post(thread, "before")
            await wait_run(client, thread, run["run_id"])
        _, code, body = await readyz(pod.url)
        assert (code, body["status"]) == (200, "ready"), body

        cases: list[tuple[str, tuple[Postgres | NatsServer, ...], set[str]]] = [
            ("nats", (nats,), {"nats"}),
            ("postgres", (pg,), {"postgres"}),
            ("both", (pg, nats), {"postgres", "nats"}),
        ]
        for label, servers, away in cases:
            with frozen(*servers):
                # The pod's own queries answer for PostgreSQL while they are fresh (a ping
                # costs a transaction: issue 29): a freeze shows within that window.
                noticed = time.monotonic() + Database.PING_FRESH_S + CHECK_TIMEOUT_S
                degraded = 0
                while degraded < PROBES:
                    took, code, body = await readyz(pod.url)
                    print(f"\n{label} frozen: /readyz in {took:.2f}s {body}")
                    assert code == 200, body  # still serving: a shared dependency never gates
                    # Inside the probe's timeout: the checks ran concurrently, each bounded.
                    assert took < PROBE_TIMEOUT_S
                    seen = {k for k in ("postgres", "nats") if not body["checks"][k]}
                    assert body["status"] == ("degraded" if seen else "ready"), body
                    if seen != away:
                        # Not all of the freeze shows yet: only within the window, and never
                        # a dependency that is not frozen.
                        assert degraded == 0 and seen < away, body
                        assert time.monotonic() < noticed, body
                        await asyncio.sleep(0.2)  # paces probing until the freeze shows
                        continue
                    degraded += 1
            # Thawed: the hung checks complete and the next probe reads ready again.
            for _ in range(100):
                _, code, body = await readyz(pod.url)
                if body["status"] == "ready":
                    break
                await asyncio.sleep(0.1)  # paces re-probing until the thawed checks answer
            assert body["status"] == "ready", (label, body)

        # The pod served through it all: a run after the freezes completes.
        async with cluster.client() as client:
            thread = unique()
            run = await client.post(thread, "after")
            assert (await wait_run(client, thread, run["run_id"]))["status"] == "success"
    finally:
        await cluster.stop()
