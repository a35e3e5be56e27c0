"""Footprint of a pod: RSS and CPU idle, with 100 active runs, and with a client on each.

RSS is the pod process's VmRSS (/proc/<pid>/status); CPU is its user+system time over a 5 s
window, as a share of one core. The runs are long (mock delay 50 ms, 20 chunks/s each, so
2,000 chunks/s in all) and are cancelled at the end.

    python -m bench.footprint [--runs 100]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path

from bench.harness import Proc, Stack, pod, pod_env, run_async, say, table
from bench.sse import HttpConn, attach, get


async def sample(p: Proc, seconds: float = 5.0) -> tuple[int, float]:
    c0, t0 = p.cpu_s(), time.monotonic()
    await asyncio.sleep(seconds)
    return p.rss_kb(), (p.cpu_s() - c0) / (time.monotonic() - t0)


async def main(runs: int) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    rows = []
    with Stack() as stack:
        url = stack.new_database(f"fp_{uuid.uuid4().hex[:6]}")
        p = pod("fp-0", pod_env(url, stack.nats.url, polling_s=0.05, delay_ms=50), log_dir)
        await p.start()
        try:
            rss, cpu = await sample(p, 3.0)
            rows.append(["just started (ready)", f"{rss / 1024:.0f} MiB", f"{cpu * 100:.0f} %"])
            # One short run so that the run path's code and connections are loaded.
            conn = await HttpConn.open(p.port)
            body = {"input": "x", "model_options": {"chunks": 3, "delay_ms": 0}}
            await conn.request("POST", "/threads/fp-warm/runs", body)
            s, c = await attach(p.port, "/threads/fp-warm/attach")
            assert s.finished is not None
            await asyncio.wait_for(s.finished, 30)
            c.close()
            rss, cpu = await sample(p)
            rows.append(["idle, after one run", f"{rss / 1024:.0f} MiB", f"{cpu * 100:.0f} %"])

            threads = [f"fp-{uuid.uuid4().hex[:8]}" for _ in range(runs)]
            run_ids = []
            body = {"input": "x", "model_options": {"chunks": 100_000, "delay_ms": 50}}
            for t in threads:
                resp = await conn.request("POST", f"/threads/{t}/runs", body)
                assert resp.status == 202, resp.body
                run_ids.append(resp.json()["run_id"])
            deadline = time.monotonic() + 60
            while True:
                states = [
                    (await get(p.port, f"/threads/{t}/runs/{r}")).json()["status"]
                    for t, r in zip(threads, run_ids, strict=True)
                ]
                if all(x == "running" for x in states):
                    break
                assert time.monotonic() < deadline, f"not all running: {states}"
                await asyncio.sleep(0.5)
            await asyncio.sleep(2.0)
            rss, cpu = await sample(p)
            rows.append(
                [f"{runs} active runs, no clients", f"{rss / 1024:.0f} MiB", f"{cpu * 100:.0f} %"]
            )
            streams = [await attach(p.port, f"/threads/{t}/attach", keep=False) for t in threads]
            await asyncio.sleep(2.0)
            rss, cpu = await sample(p)
            rows.append(
                [
                    f"{runs} active runs, one client each",
                    f"{rss / 1024:.0f} MiB",
                    f"{cpu * 100:.0f} %",
                ]
            )
            for t, r in zip(threads, run_ids, strict=True):
                await conn.request("POST", f"/threads/{t}/runs/{r}/cancel")
            for _, c in streams:
                c.close()
            conn.close()
            say("footprint: " + "; ".join(f"{r[0]}: {r[1]}, {r[2]}" for r in rows))
        finally:
            await p.stop()
    return "\n\n".join(
        [
            "## Footprint of one pod",
            "VmRSS of the pod process; CPU = its user+system time over 5 s as a share of one "
            "core. Active runs: mock delay 50 ms (20 chunks/s each).",
            table(["state", "RSS", "pod CPU"], rows),
        ]
    )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    print(run_async(lambda: main(args.runs)))


if __name__ == "__main__":
    cli()
