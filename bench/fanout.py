"""Fan-out: one run, many SSE clients on one pod; every client gets every chunk, and how late.

The clients attach while the run is queued behind a blocker run on the same thread (attach
follows the thread's latest run), so none of them replays: when the blocker is cancelled the
run starts and streams C chunks at 20 chunks/s (mock delay 50 ms) to all of them at once.
A chunk carries no timestamp, so per chunk i a client's delay is its arrival time minus the
earliest arrival of chunk i at any client, and minus the arrival of chunk i at a plain core
NATS subscriber of the thread's subject running in a process of its own. Clocks are
CLOCK_MONOTONIC (time.perf_counter), the same across processes on Linux.

All clients run in one asyncio (uvloop) process on the same 2 cores as the pod, nats-server
and PostgreSQL: the client's own read loop is part of every delay measured here.

Its first runs compared the product's relay with a prototype (one timer-woken future per
waiting client, each SSE frame encoded once per pod); the product took it in 3c3d77e and the
prototype was removed. docs/benchmarks.md keeps the before/after.

    python -m bench.fanout [--clients 1000] [--chunks 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from bench.harness import (
    SERVE,
    Proc,
    Stack,
    ms,
    pct,
    pod,
    pod_env,
    run_async,
    say,
    table,
    tree_at,
)
from bench.sse import HttpConn, attach, get

INDEX = b'"index":'


def chunk_index(data: bytes) -> int:
    """The `index` of a chunk event without a full JSON parse (client CPU is scarce here)."""
    i = data.index(INDEX) + len(INDEX)
    j = data.index(b",", i)
    return int(data[i:j])


async def metric(p: Proc, name: str) -> float:
    text = (await get(p.port, "/metrics")).body.decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def raw_subscriber(nats_url: str, subject: str, run_id: str, out: str) -> None:
    """Child process: stamp the run's chunks on the subject; write {index: time} at its `done`."""
    import nats

    nc = await nats.connect(nats_url)
    got: dict[int, float] = {}
    finished = asyncio.get_running_loop().create_future()

    async def on_msg(msg: object) -> None:
        t = time.perf_counter()
        data: bytes = msg.data  # type: ignore[attr-defined]
        if run_id.encode() not in data:
            return  # the blocker's events
        if b'"type":"chunk"' in data:
            got.setdefault(chunk_index(data), t)
        elif b'"type":"done"' in data and not finished.done():
            finished.set_result(None)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.wait_for(finished, 300)
    await asyncio.to_thread(Path(out).write_text, json.dumps(got))
    await nc.close()


async def post(port: int, thread: str, chunks: int, delay_ms: float) -> str:
    conn = await HttpConn.open(port)
    try:
        body = {"input": "fan", "model_options": {"chunks": chunks, "delay_ms": delay_ms}}
        resp = await conn.request("POST", f"/threads/{thread}/runs", body)
        assert resp.status == 202, resp.body
        return str(resp.json()["run_id"])
    finally:
        conn.close()


async def status(port: int, thread: str, run_id: str) -> str:
    return str((await get(port, f"/threads/{thread}/runs/{run_id}")).json()["status"])


VARIANTS: dict[str, dict[str, str]] = {"stock": {}}
PROTO = [sys.executable, "-m", "bench.proto_pod"]


async def main(
    clients: int, chunks: int, variants: list[str], profile: bool = False, base: str | None = None
) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    results: dict[str, list[list[object]]] = {}
    profiles = []
    trees: dict[str, Path | None] = {v: None for v in variants}
    if base is not None:  # before/after: the base revision's stock pod first
        sha, tree = tree_at(base)
        variants = [f"base {sha}", *("this tree" if v == "stock" else v for v in variants)]
        trees = {v: None for v in variants} | {variants[0]: tree}
    with Stack() as stack:
        for i, variant in enumerate(variants):
            url = stack.new_database(f"fan_{i}_{uuid.uuid4().hex[:6]}")
            env = pod_env(url, stack.nats.url, polling_s=0.05, delay_ms=50)
            env.update(VARIANTS.get(variant, {}))
            tree = trees[variant]
            p = pod(f"fan-{i}", env, log_dir, PROTO if tree is None else SERVE, tree=tree)
            await p.start()
            thread = f"fan-{uuid.uuid4().hex[:8]}"
            try:
                rows, prof = await fan(p, stack.nats.url, thread, clients, chunks, log_dir, profile)
            finally:
                await p.stop()
            results[variant] = rows
            if prof:
                profiles.append(f"Pod profile during the run, {variant} (py-spy --gil):\n\n{prof}")
    measures = [r[0] for r in next(iter(results.values()))]
    combined = [[m, *(results[v][k][1] for v in variants)] for k, m in enumerate(measures)]
    return "\n\n".join(
        [
            f"## Fan-out: one run, {clients} SSE clients on one pod",
            f"{chunks} chunks at 20 chunks/s (mock delay 50 ms). Clients: raw asyncio "
            "sockets in one uvloop process sharing the 2 cores; each client's delay for chunk "
            "i is measured against the earliest client's arrival of chunk i and against a "
            "core-NATS subscriber's (separate process). Memory per client = pod VmRSS "
            "difference (all attached and idle, run queued) / clients.",
            table(["measure", *variants], combined),
            *profiles,
        ]
    )


async def fan(
    p: Proc, nats_url: str, thread: str, clients: int, chunks: int, log_dir: Path, profile: bool
) -> tuple[list[list[object]], str]:
    # Warm the pod (a first run on another thread), then park run B behind blocker A.
    warm = f"warm-{uuid.uuid4().hex[:6]}"
    await post(p.port, warm, 5, 0)
    stream, conn = await attach(p.port, f"/threads/{warm}/attach")
    assert stream.finished is not None
    await asyncio.wait_for(stream.finished, 30)
    conn.close()
    # The blocker says one chunk a second: quiet, yet a cancel takes effect within a second.
    blocker = await post(p.port, thread, 100_000, 1000)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while await status(p.port, thread, blocker) != "running":
        assert loop.time() < deadline, "blocker never started"
        await asyncio.sleep(0.05)
    run_b = await post(p.port, thread, chunks, 50)
    await asyncio.sleep(1.0)
    rss0 = p.rss_kb()

    arrivals: list[list[float]] = [[] for _ in range(clients)]
    indexes: list[list[int]] = [[] for _ in range(clients)]
    status_done: list[str | None] = [None] * clients

    def handler(k: int):  # type: ignore[no-untyped-def]
        def on_event(t: float, ev: str, data: bytes, eid: str | None) -> None:
            if ev == "chunk":
                arrivals[k].append(t)
                indexes[k].append(chunk_index(data))
            elif ev == "done":
                status_done[k] = json.loads(data)["status"]
            elif ev == "reset":
                arrivals[k].clear()
                indexes[k].clear()

        return on_event

    streams = []
    t0 = time.monotonic()
    for start in range(0, clients, 100):
        got = await asyncio.gather(
            *(
                attach(p.port, f"/threads/{thread}/attach", keep=False, on_event=handler(k))
                for k in range(start, min(start + 100, clients))
            )
        )
        streams.extend(got)
    assert all(s.status == 200 for s, _ in streams)
    while await metric(p, "threadgate_active_attachers") < clients:
        assert time.monotonic() - t0 < 60, "clients never all attached"
        await asyncio.sleep(0.1)
    attach_s = time.monotonic() - t0
    await asyncio.sleep(1.0)
    rss1 = p.rss_kb()
    say(f"{clients} attached in {attach_s:.1f}s; RSS {rss0 / 1024:.0f} → {rss1 / 1024:.0f} MiB")

    out = log_dir / "raw.json"
    sub = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fanout",
        "--raw-sub",
        nats_url,
        f"threadgate.thread.{thread}",
        run_b,
        str(out),
        stdout=asyncio.subprocess.PIPE,
    )
    assert sub.stdout is not None
    assert (await asyncio.wait_for(sub.stdout.readline(), 30)).strip() == b"ready"

    spy = None
    if profile:
        from bench.profile import record

        spy = await record(p.pid, chunks * 0.05 + 3, log_dir / "fan.raw")
    cpu0 = p.cpu_s()
    cancel = await HttpConn.open(p.port)
    t_cancel = time.monotonic()
    resp = await cancel.request("POST", f"/threads/{thread}/runs/{blocker}/cancel")
    cancel.close()
    say(f"cancel answered {resp.status} in {time.monotonic() - t_cancel:.1f}s")
    t_run = time.monotonic()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(s.finished for s, _ in streams if s.finished is not None)),
            chunks * 0.05 + 60,
        )
    except TimeoutError:
        states = [await status(p.port, thread, r) for r in (blocker, run_b)]
        ended = sum(1 for s, _ in streams if s.finished is not None and s.finished.done())
        got = sum(len(a) for a in arrivals)
        raise RuntimeError(
            f"clients not done: runs {states}, {ended} streams ended, {got} chunks read"
        ) from None
    run_s = time.monotonic() - t_run
    prof = ""
    if spy is not None:
        from bench.profile import summarize

        await asyncio.wait_for(spy.wait(), 60)
        comp, own, total = summarize(log_dir / "fan.raw", 12)
        prof = f"{comp}\n\n{own}"
        say(f"fan-out profile ({total} samples)\n{prof}")
    cpu = p.cpu_s() - cpu0
    rss2 = p.rss_kb()
    for _, c in streams:
        c.close()
    await asyncio.wait_for(sub.wait(), 30)
    raw = {int(k): v for k, v in json.loads(out.read_text()).items()}
    assert (await status(p.port, thread, run_b)) == "success"

    complete = sum(
        1
        for k in range(clients)
        if indexes[k] == list(range(chunks)) and status_done[k] == "success"
    )
    earliest = [min(arrivals[k][i] for k in range(clients)) for i in range(chunks)]
    vs_first = [arrivals[k][i] - earliest[i] for k in range(clients) for i in range(chunks)]
    vs_raw = [arrivals[k][i] - raw[i] for k in range(clients) for i in range(chunks) if i in raw]
    first_vs_raw = [earliest[i] - raw[i] for i in range(chunks) if i in raw]
    per_client = (rss1 - rss0) * 1024 / clients
    rows = [
        ["clients with every chunk, in order, then done", f"{complete} / {clients}"],
        ["chunks per client", chunks],
        ["events delivered", f"{complete * chunks:,}"],
        ["attach time for all clients", f"{attach_s:.1f} s"],
        [
            "delay vs. earliest client p50 / p99 / max",
            f"{ms(pct(vs_first, 50))} / {ms(pct(vs_first, 99))} / {ms(max(vs_first))} ms",
        ],
        [
            "delay vs. raw NATS subscriber p50 / p99 / max",
            f"{ms(pct(vs_raw, 50))} / {ms(pct(vs_raw, 99))} / {ms(max(vs_raw))} ms",
        ],
        [
            "earliest client vs. raw subscriber p50 / p99",
            f"{ms(pct(first_vs_raw, 50))} / {ms(pct(first_vs_raw, 99))} ms",
        ],
        [
            "pod RSS before attach / attached / after run",
            f"{rss0 / 1024:.0f} / {rss1 / 1024:.0f} / {rss2 / 1024:.0f} MiB",
        ],
        ["memory per attached client", f"{per_client / 1024:.1f} KiB"],
        ["pod CPU during the run", f"{cpu:.2f} s over {run_s:.1f} s ({cpu / run_s * 100:.0f} %)"],
        ["run start (cancel of the blocker) → last client done", f"{run_s:.1f} s"],
    ]
    return rows, prof


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--profile", action="store_true", help="py-spy the pod during the run")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--base", metavar="REV", help="before/after: a pod of git revision REV too")
    ap.add_argument("--raw-sub", nargs=4, metavar=("NATS_URL", "SUBJECT", "RUN_ID", "OUT"))
    args = ap.parse_args()
    if args.raw_sub:
        run_async(lambda: raw_subscriber(*args.raw_sub))
        return
    variants = args.variants.split(",")
    print(run_async(lambda: main(args.clients, args.chunks, variants, args.profile, args.base)))


if __name__ == "__main__":
    cli()
