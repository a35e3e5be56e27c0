"""What reading a big conversation costs a pod: 8 clients at once GET the messages of a
thread of ~18 MB of JSON from a `threadgate serve` pod; its resident memory may grow by at
most 64 MiB.

Before pages were streamed, one such GET cost the pod ~121 MiB at its peak and eight at once
+554 MiB (issue 26; this test measured +497 MiB and a /healthz of 6.2 s on that build). The
thread is three runs of 100,000 parts each, as the mock streams them with `chunks: 100000`:
`data_every: 1` (all data parts), `data_every: 2` (text and data in turn), and the same with
text PostgreSQL stores escaped (NUL). They are written by the store's own `store_reply` and
`finish` (what a run's steps call) rather than streamed by three runs of ~100 s each: the rows
are those a run stores, and the read path, which this measures, is the pod's own.

The peak is the kernel's (VmHWM, reset through /proc/<pid>/clear_refs before the GETs), not
a sample; without the right to reset it the test samples VmRSS every 5 ms instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import httpx
import pytest
from threadgate.ids import new_run_id
from threadgate.store.db import Database
from threadgate.store.replies import StoredPart, merged
from threadgate.store.runs import NewRun, PgRunStore

from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod

PARTS = 100_000
CLIENTS = 8
BOUND_MIB = 64


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def replies() -> list[list[StoredPart]]:
    """The three replies: data parts only; text and data in turn; the same, escaped."""

    def tick(i: int) -> StoredPart:
        return ("tick", {"i": i, "attempt": 1})

    return [
        [tick(i) for i in range(PARTS)],
        [tick(i) if i % 2 else f"chunk-{i} " for i in range(PARTS)],
        [tick(i) if i % 2 else f"chunk-{i} é\x00" for i in range(PARTS)],
    ]


async def build_thread(url: str, thread: str) -> int:
    """The thread of `replies()`, each a finished run; the bytes they are stored in."""
    db = Database(url, max_size=2)
    await db.open()
    store = PgRunStore(db)
    try:
        for parts in replies():
            run_id = new_run_id()
            async with db.pool.connection() as conn:
                await store.insert_run(
                    conn, NewRun(run_id=run_id, thread_id=thread, input="go", accepted_by="test")
                )
            assert await store.store_reply(run_id, thread, 0, parts, "complete")
            await store.finish(run_id, "success")
        async with db.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT sum(octet_length(content) + coalesce(octet_length(layout), 0)) AS n"
                " FROM threadgate.messages WHERE thread_id = %s",
                (thread,),
            )
            row = await cur.fetchone()
        return int(row["n"]) if row else 0
    finally:
        await db.close()


async def test_eight_readers_of_an_18_mb_thread(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(size=1)
    pod = cluster.pods[0]
    assert pod.pid is not None
    thread = "big-thread"
    stored = await build_thread(cluster.env["THREADGATE_DATABASE_URL"], thread)

    async with httpx.AsyncClient(base_url=pod.url, timeout=120) as http:
        # Warm: the routes' code paths once, on a small thread.
        await http.post("/threads/small/runs", json={"input": "x", "model_options": {"chunks": 2}})
        for _ in range(3):
            assert (await http.get("/threads/small/messages")).status_code == 200
            assert (await http.get("/threads/small/runs")).status_code == 200
        await asyncio.sleep(1.0)  # lets the small run end and the pod settle before the baseline
        idle_kib = status_kib(pod.pid, "VmRSS")
        exact = reset_peak(pod.pid)
        sampled = [idle_kib]
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                sampled.append(status_kib(pod.pid or 0, "VmRSS"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.005)  # the sampling period

        async def read() -> bytes:
            async with http.stream("GET", f"/threads/{thread}/messages") as resp:
                assert resp.status_code == 200
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
            return bytes(body)

        health_s: list[float] = []

        async def health() -> None:
            while not stop.is_set():
                began = time.monotonic()
                assert (await http.get("/healthz")).status_code == 200
                health_s.append(time.monotonic() - began)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)  # a probe's period

        sampler = None if exact else asyncio.create_task(sample())
        prober = asyncio.create_task(health())
        started = time.monotonic()
        bodies = await asyncio.gather(*(read() for _ in range(CLIENTS)))
        took = time.monotonic() - started
        stop.set()
        await prober
        if sampler is not None:
            await sampler
        peak_kib = status_kib(pod.pid, "VmHWM") if exact else max(sampled)
        health = await http.get("/healthz")
        assert health.status_code == 200

    sizes = [len(b) for b in bodies]
    grew_mib = (peak_kib - idle_kib) / 1024
    print(
        f"\n{CLIENTS} x GET /messages of a thread stored in {stored / 1e6:.1f} MB (answers"
        f" {sizes[0] / 1e6:.1f} MB each): idle {idle_kib / 1024:.0f} MiB, peak"
        f" {peak_kib / 1024:.0f} MiB (+{grew_mib:.1f} MiB, {'VmHWM' if exact else 'sampled'}),"
        f" {took:.1f} s for all; /healthz meanwhile: {len(health_s)} probes, slowest"
        f" {max(health_s):.2f} s"
    )
    assert grew_mib <= BOUND_MIB
    assert len(set(bodies)) == 1  # every reader got the same page
    assert all(s > 17_000_000 for s in sizes)
    page = json.loads(bodies[0])
    got = [m["parts"] for m in page["messages"] if m["role"] == "assistant"]
    assert got == [merged(r) for r in reversed(replies())]  # newest first


async def test_eight_readers_of_a_big_run_and_a_page_of_runs(start_cluster: StartCluster) -> None:
    """The run listing and a run's status read a reply's text, never its parts: 8 at once of
    each cost the pod little (GET of a run parsed its 100,000 parts: +309 MiB for 8, before
    replies were stored by layout)."""
    cluster = await start_cluster(size=1)
    pod = cluster.pods[0]
    assert pod.pid is not None
    await build_thread(cluster.env["THREADGATE_DATABASE_URL"], "big-runs")
    async with httpx.AsyncClient(base_url=pod.url, timeout=120) as http:
        page = (await http.get("/threads/big-runs/runs")).json()
        run_id = page["runs"][0]["run_id"]
        for path in (f"/threads/big-runs/runs/{run_id}", "/threads/big-runs/runs"):
            for _ in range(3):  # warm
                assert (await http.get("/threads/small/runs")).status_code == 200
            idle_kib = status_kib(pod.pid, "VmRSS")
            exact = reset_peak(pod.pid)
            answers = await asyncio.gather(*(http.get(path) for _ in range(CLIENTS)))
            assert all(a.status_code == 200 for a in answers)
            peak_kib = status_kib(pod.pid, "VmHWM") if exact else status_kib(pod.pid, "VmRSS")
            grew_mib = (peak_kib - idle_kib) / 1024
            print(f"\n{CLIENTS} x GET {path}: +{grew_mib:.1f} MiB ({'VmHWM' if exact else 'now'})")
            assert grew_mib <= BOUND_MIB
