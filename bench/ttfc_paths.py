"""TTFC by start path: the product's queue poll vs. prototypes that start a run sooner.

Each path runs on a bench-only pod (`bench/proto_pod.py`, which wraps the product's enqueue;
app/ is untouched), queue polling 0.05 s, and is measured the same way as bench/ttfc.py. Then
its correctness is probed with two pods on one database:

- overlap: run A (0.5 s of chunks) is posted to one pod and run B to the other, on the same
  thread, right after; B must begin its reply after A finished (one active run per thread).
  Done both ways round, on several threads at once.
- recovery (eager only; kick and queue use the stock dispatch): the pod executing a run is
  SIGKILLed after its first chunk and restarted under its name; the run must finish with
  attempt 2 and the whole reply.

    python -m bench.ttfc_paths [--paths queue,eager,kick,direct] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from threadgate.models.mock import mock_reply

from bench.harness import PgCounters, Proc, Stack, ms, pct, pod, pod_env, run_async, say, table
from bench.rigs import LEVELS, VariantResult, breakdown, run_phase
from bench.sse import HttpConn, attach

PROTO = [sys.executable, "-m", "bench.proto_pod"]
TERMINAL = ("success", "error", "cancelled", "interrupted")


async def wait_run(port: int, thread: str, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    conn = await HttpConn.open(port)
    try:
        deadline = time.monotonic() + timeout
        while True:
            run = (await conn.request("GET", f"/threads/{thread}/runs/{run_id}")).json()
            if run["status"] in TERMINAL or time.monotonic() > deadline:
                return dict(run)
            await asyncio.sleep(0.05)
    finally:
        conn.close()


async def post(port: int, thread: str, chunks: int, delay_ms: float) -> str:
    conn = await HttpConn.open(port)
    try:
        body = {"input": "probe", "model_options": {"chunks": chunks, "delay_ms": delay_ms}}
        resp = await conn.request("POST", f"/threads/{thread}/runs", body)
        assert resp.status == 202, resp.body
        return str(resp.json()["run_id"])
    finally:
        conn.close()


async def overlap_probe(a: Proc, b: Proc, threads: int = 4) -> tuple[int, int]:
    """(overlapping pairs, pairs): B posted right after A on the same thread, other pod."""

    async def pair(first: Proc, second: Proc) -> bool:
        thread = f"probe-{uuid.uuid4().hex[:10]}"
        run_a = await post(first.port, thread, 20, 25)
        run_b = await post(second.port, thread, 3, 0)
        ra = await wait_run(first.port, thread, run_a)
        rb = await wait_run(first.port, thread, run_b)
        assert ra["status"] == rb["status"] == "success", (ra, rb)
        began_b = datetime.fromisoformat(rb["started_at"])
        ended_a = datetime.fromisoformat(ra["finished_at"])
        return began_b < ended_a

    got = await asyncio.gather(
        *(pair(a, b) for _ in range(threads)), *(pair(b, a) for _ in range(threads))
    )
    return sum(got), len(got)


async def recovery_probe(pods: list[Proc]) -> str:
    """SIGKILL the pod executing a run after its first chunk; restart it; the run must finish."""
    thread = f"crash-{uuid.uuid4().hex[:10]}"
    run_id = await post(pods[0].port, thread, 60, 25)
    first = asyncio.Event()

    def on_event(t: float, ev: str, data: bytes, eid: str | None) -> None:
        if ev == "chunk":
            first.set()

    _, conn = await attach(pods[0].port, f"/threads/{thread}/attach", on_event=on_event)
    await asyncio.wait_for(first.wait(), 10)
    conn.close()
    run = await wait_run(pods[0].port, thread, run_id, timeout=0.0)
    victim = next(p for p in pods if p.env["POD_NAME"] == run["executor"])
    survivor = next(p for p in pods if p is not victim)
    await victim.kill()
    t_kill = time.monotonic()
    victim.spawn()
    await victim.wait_ready()
    final = await wait_run(survivor.port, thread, run_id, timeout=60)
    took = time.monotonic() - t_kill
    ok = (
        final["status"] == "success" and final["attempt"] >= 2 and final["output"] == mock_reply(60)
    )
    verdict = "recovered" if ok else "NOT recovered"
    return (
        f"{verdict}: status {final['status']}, attempt {final['attempt']}, "
        f"done {took:.1f} s after the kill"
    )


async def measure_path(
    stack: Stack, path: str, log_dir: Path, rounds: dict[int, int]
) -> tuple[VariantResult, str, str]:
    name = f"paths_{path}_{uuid.uuid4().hex[:6]}"
    url = stack.new_database(name)
    env = pod_env(url, stack.nats.url, polling_s=0.05, delay_ms=0)
    env["BENCH_START_PATH"] = path
    p0 = pod(f"{path}-0", env, log_dir, PROTO)
    say(f"[{path}] pod ready in {await p0.start():.1f}s")
    pc = PgCounters(stack.admin_url, name)
    pods = [p0]
    try:
        result = VariantResult(path, {}, float("nan"), float("nan"), *(float("nan"),) * 3)
        for x in range(3):  # warm-up
            await run_phase(p0, 1, 0, f"warm{x}")
        for level in LEVELS:
            _, w0 = pc.read()
            phase = await run_phase(p0, level, rounds[level], path)
            runs = len(phase.samples) + len(phase.cold)
            if level == 10:
                _, w1 = pc.read()
                result.load_writes_per_run = (w1 - w0) / runs
            phase.breakdown = breakdown(url, phase.samples)
            result.phases[level] = phase
            xs = [s.ttfc for s in phase.samples]
            say(f"[{path}] {level:>3} threads: p50 {ms(pct(xs, 50))} p99 {ms(pct(xs, 99))} ms")
        if path == "queue":
            return result, "—", "—"
        p1 = pod(f"{path}-1", env, log_dir, PROTO)
        pods.append(p1)
        await p1.start()
        overlaps, pairs = await overlap_probe(p0, p1)
        overlap = f"{overlaps} of {pairs} pairs overlapped"
        say(f"[{path}] {overlap}")
        recovery = await recovery_probe(pods) if path == "eager" else "—"
        say(f"[{path}] {recovery}")
        return result, overlap, recovery
    finally:
        pc.close()
        await asyncio.gather(*(p.stop() for p in pods))


DESCRIPTION = {
    "queue": "product: enqueue, the queue worker's next poll starts it",
    "eager": "enqueue, then run the queue's claim now on this pod (the poll's own function)",
    "kick": "enqueue, then wake the local queue worker's poll",
    "direct": "start_workflow_async without the queue when the thread is idle",
}


async def main(paths: list[str], quick: bool) -> str:
    rounds = {1: 10, 10: 3, 100: 1} if quick else {1: 20, 10: 6, 100: 1}
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    rows, probe_rows, cost_rows = [], [], []
    with Stack() as stack:
        for path in paths:
            res, overlap, recovery = await measure_path(stack, path, log_dir, rounds)
            for level, ph in res.phases.items():
                xs = [s.ttfc for s in ph.samples]
                rows.append([path, level, len(xs), pct(xs, 50), pct(xs, 99), ph.breakdown])
            probe_rows.append([path, DESCRIPTION[path], overlap, recovery])
            cost_rows.append([path, f"{res.load_writes_per_run:.1f}"])
    say(f"pod logs in {log_dir}")
    ref = {r[1]: r[3] for r in rows if r[0] == paths[0]}
    ttfc_rows = [
        [
            path,
            level,
            n,
            ms(p50),
            ms(p99),
            f"{p50 / ref[level]:.2f}" if level in ref else "—",
            ms(bd["enq→deq"]),
            ms(bd["deq→step"]),
        ]
        for path, level, n, p50, p99, bd in rows
    ]
    return "\n\n".join(
        [
            "## Time to first chunk by start path (prototypes; polling 0.05 s)",
            "Same workload as above, on `bench/proto_pod.py` pods (the product's enqueue "
            f"wrapped per path; app/ untouched). Ratio = p50 / {paths[0]}'s p50 at the same "
            "thread count, this run.",
            table(
                [
                    "path",
                    "threads",
                    "samples",
                    "TTFC p50 ms",
                    "TTFC p99 ms",
                    f"p50 / {paths[0]}",
                    "enq→deq ms",
                    "deq→step ms",
                ],
                ttfc_rows,
            ),
            "Correctness probes (two pods, one database): overlap = run B began its reply "
            "before run A of the same thread finished; recovery = SIGKILL of the executing pod "
            "after the first chunk, restart under the same name.",
            table(["path", "what it does", "one run per thread", "crash recovery"], probe_rows),
            "PostgreSQL write transactions per run at 10 threads (transaction ids consumed, "
            "exact; idle polling writes none):",
            table(["path", "write xacts per run"], cost_rows),
        ]
    )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default="queue,eager,kick,direct")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(run_async(lambda: main(args.paths.split(","), args.quick)))


if __name__ == "__main__":
    cli()
