"""What clients of one long reply cost a pod: plain SSE against the AI SDK stream (issue 24).

One pod per format, the same run on each: a 100,000-part mock reply, N clients attached from
its start reading every event. The figure is the pod's peak RSS (VmRSS, sampled every 50 ms)
above its RSS just before the run, and the difference between the formats. Before contract v3
the AI SDK encoder kept every part per client (50 clients: +266 MiB against +1 MiB).

    python -m bench.client_memory [--parts 100000] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from pathlib import Path

from bench.harness import Proc, Stack, loadavg, pod, pod_env, run_async, say, table
from bench.sse import HttpConn, attach


async def peak_rss(p: Proc, parts: int, clients: int, fmt: str) -> tuple[int, int, int]:
    """(RSS before, peak RSS, events per client) for `clients` on one run, in KiB."""
    thread = f"mem-{uuid.uuid4().hex[:8]}"
    conn = await HttpConn.open(p.port)
    warm = {"input": "x", "model_options": {"chunks": 3, "delay_ms": 0}}
    await conn.request("POST", f"/threads/{thread}-warm/runs", warm)
    path = f"/threads/{thread}/attach" + ("?format=ai-sdk" if fmt == "ai-sdk" else "")
    done_event = None if fmt == "ai-sdk" else "done"
    chunk_event = "message" if fmt == "ai-sdk" else "chunk"
    # A thread with no run yet: the native stream waits for its first run; the AI SDK one
    # answers 204, so its clients attach once the run is accepted.
    body = {"input": "x", "model_options": {"chunks": parts, "delay_ms": 0.2}}
    counts = [0] * clients

    async def one(i: int) -> tuple[object, HttpConn]:
        def count(*_: object) -> None:
            counts[i] += 1

        return await attach(
            p.port,
            path,
            keep=False,
            on_event=count,
            chunk_event=chunk_event,
            done_event=done_event,
        )

    streams = []
    if fmt == "sse":
        streams = [await one(i) for i in range(clients)]
    before = p.rss_kb()
    resp = await conn.request("POST", f"/threads/{thread}/runs", body)
    assert resp.status == 202, resp.status
    if fmt != "sse":
        streams = [await one(i) for i in range(clients)]
    peak = before
    finished = [s.finished for s, _ in streams]  # type: ignore[attr-defined]
    while not all(f is not None and f.done() for f in finished):
        peak = max(peak, p.rss_kb())
        await asyncio.sleep(0.05)  # the sampling clock of the RSS
    for _, c in streams:
        c.close()
    conn.close()
    return before, peak, min(counts)


async def main(parts: int, clients: int) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    rows = []
    with Stack() as stack:
        for fmt in ("sse", "ai-sdk"):
            url = stack.new_database(f"mem_{fmt.replace('-', '')}_{uuid.uuid4().hex[:6]}")
            env = pod_env(url, stack.nats.url, polling_s=None, coalesce_ms=0)  # a part a chunk
            p = pod(f"mem-{fmt}", env, log_dir)
            await p.start()
            try:
                say(f"{fmt}: {clients} clients of a {parts}-part reply ...")
                before, peak, events = await peak_rss(p, parts, clients, fmt)
            finally:
                await p.stop()
            grown = f"+{(peak - before) / 1024:.1f}"
            rows.append([fmt, f"{before / 1024:.0f}", f"{peak / 1024:.0f}", grown, events])
    grown = {r[0]: float(r[3][1:]) for r in rows}
    out = table(["format", "RSS before (MiB)", "peak (MiB)", "grown (MiB)", "events/client"], rows)
    diff = grown["ai-sdk"] - grown["sse"]
    return f"{out}\n\nAI SDK - SSE: {diff:+.1f} MiB ({clients} clients, {parts} parts; load {loadavg()})"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=50)
    args = ap.parse_args()
    print(run_async(lambda: main(args.parts, args.clients)))
