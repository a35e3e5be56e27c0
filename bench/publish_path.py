"""The publish path alone: CPU per message of nats-py's publish_async pipelined (what the
publisher used before) against streams/publisher.py's shared ack inbox, in this process.

50 subjects x 400 messages of a chunk's size with a Nats-Msg-Id, 64 in flight per subject,
coalescing off; both against one nats-server, in turns.

    python -m bench.publish_path [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from threadgate.devstack import NatsServer
from threadgate.settings import load_settings
from threadgate.streams.buffer import JetStreamBuffer, connect_nats
from threadgate.streams.events import chunk

from bench.harness import run_async, table

SUBJECTS, MESSAGES, WINDOW = 50, 400, 64


async def main(rounds: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="threadgate-bench-pub-", dir="/tmp"))
    server = NatsServer(root / "nats")
    server.start()
    tag = uuid.uuid4().hex[:8]
    settings = load_settings(
        pod_name="bench",
        nats_url=server.url,
        stream_name=f"PUB_{tag}",
        subject_prefix=f"pub{tag}",
        coalesce_ms=0,
    )
    nc = await connect_nats(settings, "bench")
    buffer = JetStreamBuffer(settings, nc)
    await buffer.ensure_stream()
    run = str(uuid.uuid4())

    async def publish_async(i: int) -> None:
        inflight: deque[Any] = deque()
        subject = settings.thread_subject(f"a{i}")
        for k in range(MESSAGES):
            while len(inflight) >= WINDOW:
                await inflight.popleft()
            data = chunk(run, 1, k, f"chunk-{k} ").to_bytes()
            headers = {"Nats-Msg-Id": f"{run}:a{i}:{k}"}
            inflight.append(await buffer.js.publish_async(subject, data, headers=headers))
        while inflight:
            await inflight.popleft()

    async def shared_inbox(i: int) -> None:
        pub = buffer.publisher(f"b{i}", run, 1)
        for k in range(MESSAGES):
            await pub.part(chunk(run, 1, k, f"chunk-{k} "))
        await pub.flush()

    rows = []
    try:
        for r in range(rounds):
            for name, fn in (("publish_async", publish_async), ("shared ack inbox", shared_inbox)):
                c0, t0 = time.process_time(), time.perf_counter()
                await asyncio.gather(*(fn(i) for i in range(SUBJECTS)))
                cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                n = SUBJECTS * MESSAGES
                rows.append([r + 1, name, f"{n / wall:,.0f}", f"{cpu / n * 1e6:.1f} µs"])
    finally:
        await nc.close()
        server.stop()
    return "\n\n".join(
        [
            "## The publish path: CPU per message",
            f"{SUBJECTS} subjects x {MESSAGES} chunk-sized messages with a Nats-Msg-Id, "
            f"{WINDOW} in flight per subject, in one process with one nats-server; client CPU "
            "per message (publish + ack).",
            table(["round", "path", "msgs/s", "client CPU per message"], rows),
        ]
    )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(run_async(lambda: main(args.rounds)))


if __name__ == "__main__":
    cli()
