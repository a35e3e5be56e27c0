"""SIGTERM: a pod stops taking runs, lets the ones in flight finish, then exits 0."""

from __future__ import annotations

import asyncio
import time

import httpx
import psycopg
import pytest
from threadgate.client import AsyncClient
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import Attacher, Cluster, Pod, at, running_on, wait_run

pytestmark = pytest.mark.multipod

DRAIN_S = 2


async def wait_not_ready(pod: Pod, timeout: float = 10.0) -> int:
    """Poll /readyz until it is no longer 200: its status, or 0 once nothing answers."""
    async with httpx.AsyncClient(timeout=2.0) as http, asyncio.timeout(timeout):
        while True:
            try:
                status = (await http.get(f"{pod.url}/readyz")).status_code
            except httpx.TransportError:
                return 0
            if status != 200:
                return status
            await asyncio.sleep(0.02)  # paces the polling of another process


async def assistant_messages(pod: Pod, thread: str) -> list[tuple[str, str]]:
    async with AsyncClient(pod.url) as client:
        return [
            (m["run_id"], m["content"])
            for m in await client.messages(thread)
            if m["role"] == "assistant"
        ]


@pytest.mark.cluster(size=2, drain_timeout_s=20)
async def test_sigterm_lets_the_run_in_flight_finish_then_exits_0(cluster: Cluster) -> None:
    thread = unique()
    # 6 s of reply: SIGTERM lands with ~5.7 s of it left, a window in which the draining pod
    # is seen answering 503 however busy the machine (2 s was not always enough).
    chunks = 120
    async with cluster.client() as client:
        run_id = (await client.post(thread, "x", model_options={"chunks": chunks, "delay_ms": 50}))[
            "run_id"
        ]
        x = await running_on(client, cluster, thread, run_id)
        other = cluster.others(x.name)[0]
        watcher = Attacher([other.url], thread).start()
        await watcher.wait_chunk(5)

        x.send_term()
        assert await wait_not_ready(x) == 503  # draining, still serving
        async with httpx.AsyncClient(timeout=5) as http:
            refused = await http.post(f"{x.url}/threads/{unique()}/runs", json={"input": "no"})
        assert refused.status_code == 503
        async with cluster.client([other]) as on_other:
            assert (await on_other.run(thread, run_id))["status"] == "running"

        assert await x.wait_exit(30) == 0
        run = await wait_run(client, thread, run_id, timeout=5)
        assert (run["status"], run["attempt"], run["executor"]) == ("success", 1, x.name)
        reply = await watcher.result()
    assert reply.text == mock_reply(chunks) and reply.resets == 0
    assert await assistant_messages(other, thread) == [(run_id, mock_reply(chunks))]
    log = x.log_text()
    assert log.index('"run finished: success"') < log.index('"pod stopped"')
    assert "drain timeout" not in log


@pytest.mark.cluster(size=2, drain_timeout_s=DRAIN_S)
async def test_a_run_longer_than_the_drain_is_finished_by_the_restart(cluster: Cluster) -> None:
    thread = unique()
    chunks = 100  # 4 s of reply, the drain gives it 2 s
    async with cluster.client() as client:
        options = {"chunks": chunks, "delay_ms": 40, "vary": True}
        run_id = (await client.post(thread, "x", model_options=options))["run_id"]
        x = await running_on(client, cluster, thread, run_id)
        other = cluster.others(x.name)[0]
        watcher = Attacher([other.url], thread).start()
        await watcher.wait_chunk(3)

        t0 = time.monotonic()
        code = await x.term(60)  # a bound on a hang only: the figures are printed below
        took = time.monotonic() - t0
        msgs = [r["msg"] for r in x.log_records()]
        ts = [at(r["ts"]) for r in x.log_records()]
        began = next(i for i, m in enumerate(msgs) if m.startswith("draining"))
        timeouts = [i for i, m in enumerate(msgs) if m.startswith("drain timeout")]
        stopped = msgs.index("pod stopped")
        # In this order, once each: the run gets the drain timeout once (uvicorn's shutdown
        # does not start another), it waits the whole timeout, then the pod stops.
        assert len(timeouts) == 1 and began < timeouts[0] < stopped
        assert msgs[timeouts[0]] == f"drain timeout: 1 runs left to recovery when {x.name} returns"
        waited = (ts[timeouts[0]] - ts[began]).total_seconds()
        assert waited >= DRAIN_S - 0.1
        # The run left over was stopped while the connections were open: nothing left hanging.
        assert not any("did not stop when cancelled" in m for m in msgs)
        assert not any(m.startswith("run finished") for m in msgs)
        print(
            f"\nSIGTERM → drain timeout {waited:.2f}s (drain {DRAIN_S}s) → pod stopped"
            f" {(ts[stopped] - ts[timeouts[0]]).total_seconds():.2f}s later; exit after {took:.2f}s"
        )
        async with cluster.client([other]) as on_other:
            left = await on_other.run(thread, run_id)
        assert (left["status"], left["attempt"], left["executor"]) == ("running", 1, x.name)

        await x.restart()
        run = await wait_run(client, thread, run_id)
        assert (run["status"], run["attempt"]) == ("success", 2)
        # The restart continues the reply after what the drained pod stored; a hand-off is no
        # crash (it does not count towards THREADGATE_MAX_REPLAYS).
        kept = run["attempts"][1]["resume_from"]
        assert kept >= 3 and run["attempts"][1]["kind"] == "replay"
        reply = await watcher.result()
    stored = mock_reply(chunks, {0: 1, kept: 2})
    assert code == 0
    assert reply.text == stored and reply.resets == 0 and reply.duplicates == 0
    assert await assistant_messages(x, thread) == [(run_id, stored)]
    async with await psycopg.AsyncConnection.connect(cluster.env["THREADGATE_DATABASE_URL"]) as db:
        cur = await db.execute("SELECT replays FROM threadgate.runs WHERE run_id = %s", (run_id,))
        assert await cur.fetchone() == (0,)
