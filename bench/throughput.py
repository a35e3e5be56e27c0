"""Throughput: chunks/s delivered model → JetStream → SSE clients on one pod, vs. raw JetStream.

End to end: T threads post a C-chunk run each at once (mock delay 0), one SSE client attached
per thread; every client must get chunks 0..C-1 once, in order, then `done` (verified). The
baseline, on the same nats-server in the same run: nats-py publishes the same number of
messages of the same size and headers to T subjects of a file-backed stream, acks pipelined
(publish_async, up to 64 in flight per subject, like the pod's publisher), received by one
ordered consumer per subject on the same connection (like the pod's tails).

    python -m bench.throughput [--threads 50] [--chunks 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StorageType, StreamConfig

from bench.harness import Proc, Stack, pod, pod_env, run_async, say, table, tree_at
from bench.sse import HttpConn, Stream, attach

WINDOW = 64  # the pod's default publish_window


@dataclass
class E2E:
    chunks: int
    total_s: float  # first POST written → last `done` read
    stream_s: float  # first chunk read (any client) → last chunk read
    pod_cpu_s: float
    client_cpu_s: float
    verified: int  # clients whose reply was complete and in order


def check(stream: Stream, chunks: int) -> bool:
    """Chunks 0..chunks-1 once and in order (of the last attempt), then a successful done."""
    got = []
    status = None
    for _, ev, data in stream.events:
        body = json.loads(data)
        if ev in ("run_started", "reset"):
            got = []
        elif ev == "chunk":
            got.append(body["index"])
        elif ev == "done":
            status = body["status"]
    return status == "success" and got == list(range(chunks))


async def run_e2e(p: Proc, threads: int, chunks: int) -> E2E:
    tag = uuid.uuid4().hex[:8]
    conns = [await HttpConn.open(p.port) for _ in range(threads)]
    streams: list[Stream] = []
    sconns: list[HttpConn] = []

    async def one(i: int) -> None:
        thread = f"tp-{tag}-{i}"
        body = {"input": "go", "model_options": {"chunks": chunks, "delay_ms": 0}}
        resp = await conns[i].request("POST", f"/threads/{thread}/runs", body)
        assert resp.status == 202, resp.body
        stream, sconn = await attach(p.port, f"/threads/{thread}/attach")
        streams.append(stream)
        sconns.append(sconn)
        assert stream.finished is not None
        await asyncio.wait_for(stream.finished, 120)

    cpu0, ccpu0 = p.cpu_s(), time.process_time()
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(threads)))
    finally:
        for c in conns + sconns:
            c.close()
    t_end = max(s.done_at or 0.0 for s in streams)
    firsts = [s.first_chunk for s in streams if s.first_chunk is not None]
    lasts = [max(t for t, ev, _ in s.events if ev == "chunk") for s in streams if s.events]
    return E2E(
        chunks=threads * chunks,
        total_s=t_end - t0,
        stream_s=max(lasts) - min(firsts),
        pod_cpu_s=p.cpu_s() - cpu0,
        client_cpu_s=time.process_time() - ccpu0,
        verified=sum(check(s, chunks) for s in streams),
    )


@dataclass
class Raw:
    messages: int
    seconds: float
    cpu_s: float


async def run_raw(nats_url: str, threads: int, chunks: int, msg_ids: bool = True) -> Raw:
    """Publish → ordered-consumer receive of threads x chunks messages, acks pipelined.

    `msg_ids=False` leaves out the Nats-Msg-Id header (and so JetStream's deduplication): what
    the header costs on the way in and, since a consumer delivers it, on the way out.
    """
    nc = await nats.connect(nats_url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream(timeout=10)
    tag = uuid.uuid4().hex[:8]
    stream = f"RAW_{tag}"
    await js.add_stream(
        StreamConfig(
            name=stream,
            subjects=[f"raw{tag}.thread.*"],
            storage=StorageType.FILE,
            duplicate_window=600,
        )
    )
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    received = 0
    total = threads * chunks

    async def on_msg(msg: Any) -> None:
        nonlocal received
        received += 1
        if received == total and not done.done():
            done.set_result(None)

    subs = [
        await js.subscribe(
            f"raw{tag}.thread.{i}",
            cb=on_msg,
            ordered_consumer=True,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=512 * 1024 * 1024,
        )
        for i in range(threads)
    ]
    run_id = str(uuid.uuid4())

    async def publisher(i: int) -> None:
        inflight: deque[Any] = deque()
        subject = f"raw{tag}.thread.{i}"
        for k in range(chunks):
            data = json.dumps(
                {
                    "type": "chunk",
                    "run_id": run_id,
                    "attempt": 1,
                    "index": k,
                    "text": f"chunk-{k} ",
                },
                separators=(",", ":"),
            ).encode()
            while len(inflight) >= WINDOW:
                await inflight.popleft()
            headers = {"Nats-Msg-Id": f"{run_id}:{i}:1:{k}"} if msg_ids else None
            inflight.append(await js.publish_async(subject, data, headers=headers))
        while inflight:
            await inflight.popleft()

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(publisher(i) for i in range(threads)))
    await asyncio.wait_for(done, 120)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for s in subs:
        await s.unsubscribe()
    await js.delete_stream(stream)
    await nc.close()
    return Raw(total, seconds, cpu)


async def main(threads: int, chunks: int, repeats: int, base: str | None = None) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    labels = ["this tree"]
    e2es: dict[str, list[E2E]] = {"this tree": []}
    raws: list[Raw] = []
    bare: list[Raw] = []
    with Stack() as stack:
        pods = {}
        trees: dict[str, Path | None] = {"this tree": None}
        if base is not None:  # before/after: a pod of the base revision, runs interleaved
            sha, tree = tree_at(base)
            labels.insert(0, f"base {sha}")
            e2es[labels[0]], trees[labels[0]] = [], tree
        for i, label in enumerate(labels):
            url = stack.new_database(f"tp_{i}_{uuid.uuid4().hex[:6]}")
            env = pod_env(url, stack.nats.url, polling_s=0.05, delay_ms=0)
            pods[label] = pod(f"tp-{i}", env, log_dir, tree=trees[label])
        try:
            for p in pods.values():
                await p.start()
                await run_e2e(p, 10, 50)  # warm
            await run_raw(stack.nats.url, 10, 50)
            for _ in range(repeats):  # interleaved, so that noise hits all alike
                for label, p in pods.items():
                    e2es[label].append(await run_e2e(p, threads, chunks))
                raws.append(await run_raw(stack.nats.url, threads, chunks))
                bare.append(await run_raw(stack.nats.url, threads, chunks, msg_ids=False))
                r = raws[-1]
                for label in labels:
                    e = e2es[label][-1]
                    say(
                        f"[{label}] e2e {e.chunks / e.stream_s:,.0f}/s streaming, "
                        f"{e.chunks / e.total_s:,.0f}/s total; raw {r.messages / r.seconds:,.0f}"
                        f"/s; verified {e.verified}"
                    )
        finally:
            for p in pods.values():
                await p.stop()
    best_e = max(e2es["this tree"], key=lambda e: e.chunks / e.stream_s)
    best_r = max(raws, key=lambda r: r.messages / r.seconds)
    rows = []
    for label in labels:
        for i, (e, r, b) in enumerate(zip(e2es[label], raws, bare, strict=True), 1):
            rows.append(
                [
                    label,
                    i,
                    f"{e.chunks / e.stream_s:,.0f}",
                    f"{e.chunks / e.total_s:,.0f}",
                    f"{r.messages / r.seconds:,.0f}",
                    f"{b.messages / b.seconds:,.0f} ({b.cpu_s / r.cpu_s:.2f}x CPU)",
                    f"{(e.chunks / e.stream_s) / (r.messages / r.seconds):.2f}",
                    f"{(e.chunks / e.total_s) / (r.messages / r.seconds):.2f}",
                    f"{e.pod_cpu_s:.2f} s",
                    f"{e.client_cpu_s:.2f} s",
                    f"{e.verified}/{threads}",
                ]
            )
    ratio = (best_e.chunks / best_e.stream_s) / (best_r.messages / best_r.seconds)
    verdict = f"Best of {repeats}: ratio {ratio:.2f} (target ≥ 0.5: " + (
        "met)." if ratio >= 0.5 else "not met)."
    )
    return "\n\n".join(
        [
            "## Throughput: chunks/s end to end vs. raw JetStream",
            f"{threads} threads x {chunks} chunks (mock delay 0) on one pod, one SSE client per "
            "thread, every reply verified complete and in order. 'streaming' = first chunk "
            "read by any client → last chunk read; 'total' = first POST written → last `done` "
            "read (includes accepting and starting the runs). Raw = nats-py, same message "
            "count, size and Nats-Msg-Id headers, acks pipelined (64 in flight per subject), "
            "one ordered consumer per subject; runs interleaved with the end-to-end ones. The "
            "no-Nats-Msg-Id column is the same raw run without that header (which the pod "
            "sets on every event for deduplication).",
            table(
                [
                    "pod",
                    "repeat",
                    "e2e streaming chunks/s",
                    "e2e total chunks/s",
                    "raw JetStream msgs/s",
                    "raw, no Nats-Msg-Id msgs/s (client CPU vs with)",
                    "ratio (streaming)",
                    "ratio (total)",
                    "pod CPU",
                    "client CPU",
                    "verified",
                ],
                rows,
            ),
            verdict,
        ]
    )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=50)
    ap.add_argument("--chunks", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--base", metavar="REV", help="before/after: a pod of git revision REV too")
    args = ap.parse_args()
    print(run_async(lambda: main(args.threads, args.chunks, args.repeats, args.base)))


if __name__ == "__main__":
    cli()
