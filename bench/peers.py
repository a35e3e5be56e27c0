"""Peers on the same workload, machine and run: threadgate, plain FastAPI SSE, LangGraph server.

- threadgate: one pod (queue polling 0.05 s); a turn is POST /threads/{t}/runs then attach.
- plain: bench/peer_plain.py under uvicorn, no durability; a turn is one GET /stream.
- langgraph: `langgraph dev` (the in-memory agent server of langgraph-api, from a virtualenv
  this script makes under bench/.peers/), graph bench/peer_langgraph/graph.py streaming the mock
  as custom stream events; a turn is POST /threads/{t}/runs/stream (the thread is created
  before the clock starts). Its concurrent runs are capped by --n-jobs-per-worker (set to 64).

Measured: time to first chunk (request written → first chunk read) at 1 and 10 concurrent
conversations, chunks/s for 50 streams x 400 chunks, idle RSS, and what a SIGKILL of the server
does to a run in flight (400 chunks, 50 ms apart, killed after chunk 250, restarted).

    python -m bench.peers [--systems threadgate,plain,langgraph]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from threadgate.models.mock import mock_reply

from bench.harness import (
    Proc,
    Stack,
    free_port,
    group_rss_kb,
    ms,
    pct,
    pod,
    pod_env,
    run_async,
    say,
    table,
)
from bench.rigs import KILL_AFTER, KILL_CHUNKS, KILL_DELAY_MS, System, Turn
from bench.sse import HttpConn, Stream, attach


class Threadgate(System):
    name = "threadgate"

    def __init__(self, stack: Stack, log_dir: Path) -> None:
        url = stack.new_database(f"peers_{uuid.uuid4().hex[:6]}")
        self.proc = pod("peers-tg", pod_env(url, stack.nats.url, polling_s=0.05), log_dir)

    async def start(self) -> None:
        await self.proc.start()

    async def turn(self, conv: str, chunks: int, delay_ms: float) -> Turn:
        conn = await HttpConn.open(self.proc.port)
        body = {"input": "hi", "model_options": {"chunks": chunks, "delay_ms": delay_ms}}
        t0 = time.perf_counter()
        resp = await conn.request("POST", f"/threads/{conv}/runs", body)
        conn.close()
        assert resp.status == 202, resp.body
        stream, sconn = await attach(self.proc.port, f"/threads/{conv}/attach")
        assert stream.finished is not None
        await asyncio.wait_for(stream.finished, 120)
        sconn.close()
        assert stream.first_chunk is not None
        return Turn(stream.first_chunk - t0, stream)

    async def kill_test(self) -> str:
        from threadgate.client import AsyncClient, Reply

        thread = f"kill-{uuid.uuid4().hex[:8]}"
        reply = Reply()
        seen = asyncio.Event()
        async with AsyncClient(self.proc.url) as client:
            await client.post(
                thread, "hi", model_options={"chunks": KILL_CHUNKS, "delay_ms": KILL_DELAY_MS}
            )

            async def follow() -> None:
                async for ev in client.events(thread, reconnects=60):
                    reply.apply(ev)
                    if ev.event == "chunk" and int(ev.data["index"]) >= KILL_AFTER:
                        seen.set()

            task = asyncio.create_task(follow())
            await asyncio.wait_for(seen.wait(), 60)
            await self.proc.kill()
            t_kill = time.monotonic()
            self.proc.spawn()
            await self.proc.wait_ready()
            await asyncio.wait_for(task, 60)
            took = time.monotonic() - t_kill
            runs = await client.runs(thread)
        complete = reply.text == mock_reply(KILL_CHUNKS) and reply.status == "success"
        return (
            f"run resumed after restart (attempt {runs[0]['attempt']}, the step re-ran from "
            f"its start); client got `reset` x{reply.resets} and the "
            + ("complete reply" if complete else f"INCOMPLETE reply ({len(reply.chunks)} chunks)")
            + f", done {took:.1f} s after the kill"
        )


class Plain(System):
    name = "plain FastAPI SSE"

    def __init__(self, log_dir: Path) -> None:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.peer_plain:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_")}
        self.proc = Proc("plain", cmd, env, log_dir / "plain.log", port=port, ready_path="/ok")

    async def start(self) -> None:
        await self.proc.start()

    async def turn(self, conv: str, chunks: int, delay_ms: float) -> Turn:
        t0 = time.perf_counter()
        stream, conn = await attach(self.proc.port, f"/stream?chunks={chunks}&delay_ms={delay_ms}")
        assert stream.finished is not None
        await asyncio.wait_for(stream.finished, 120)
        conn.close()
        assert stream.first_chunk is not None
        return Turn(stream.first_chunk - t0, stream)

    async def kill_test(self) -> str:
        seen = asyncio.Event()
        last: list[str | None] = [None]

        def on_event(t: float, ev: str, data: bytes, eid: str | None) -> None:
            last[0] = eid
            if ev == "chunk" and json.loads(data)["index"] >= KILL_AFTER:
                seen.set()

        path = f"/stream?chunks={KILL_CHUNKS}&delay_ms={KILL_DELAY_MS}"
        stream, conn = await attach(self.proc.port, path, on_event=on_event)
        await asyncio.wait_for(seen.wait(), 60)
        await self.proc.kill()
        with contextlib.suppress(ConnectionError):
            assert stream.finished is not None
            await asyncio.wait_for(stream.finished, 10)
        conn.close()
        got = self.chunk_count(stream)
        await self.proc.start()
        again, conn = await attach(self.proc.port, path, headers={"Last-Event-ID": last[0] or ""})
        first = (
            next(json.loads(d)["index"] for _, e, d in again.events if e == "chunk")
            if (await _wait_chunk(again))
            else None
        )
        conn.close()
        return (
            f"connection dropped after {got} chunks; the run died with the process; a "
            f"reconnect with Last-Event-ID starts a NEW run from chunk {first} (the model "
            "would be called again, the reply differs)"
        )


async def _wait_chunk(stream: Stream, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not any(e == "chunk" for _, e, _ in stream.events):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def measure(system: System, log_dir: Path) -> dict[str, Any]:
    await system.start()
    try:
        for _ in range(3):  # warm
            await system.turn(await system.conversation(), 3, 0)
        await asyncio.sleep(1.0)
        rss = group_rss_kb(system.proc.pid)
        one = [await system.turn(await system.conversation(), 5, 0) for _ in range(10)]
        convs = [await system.conversation() for _ in range(10)]
        ten: list[Turn] = []
        for r in range(7):
            got = await asyncio.gather(*(system.turn(c, 5, 0) for c in convs))
            if r:
                ten.extend(got)  # the first burst is warm-up
        streams = [await system.conversation() for _ in range(50)]
        t0 = time.perf_counter()
        many = await asyncio.gather(*(system.turn(c, 400, 0) for c in streams))
        t_end = time.perf_counter()
        first = min(t.stream.first_chunk for t in many if t.stream.first_chunk)
        last = max(t.stream.events[-1][0] for t in many if t.stream.events)
        complete = sum(1 for t in many if system.chunk_count(t.stream) == 400)
        say(f"[{system.name}] measured; kill test ...")
        kill = await system.kill_test()
        say(f"[{system.name}] {kill}")
        return {
            "ttfc1": [t.ttfc for t in one],
            "ttfc10": [t.ttfc for t in ten],
            "stream_rate": 50 * 400 / (last - first),
            "total_rate": 50 * 400 / (t_end - t0),
            "complete": complete,
            "rss": rss,
            "kill": kill,
        }
    finally:
        await system.stop()


async def main(systems_wanted: set[str]) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    results: dict[str, dict[str, Any]] = {}
    notes = []
    with Stack() as stack:
        systems: list[System] = []
        if "threadgate" in systems_wanted:
            systems.append(Threadgate(stack, log_dir))
        if "plain" in systems_wanted:
            systems.append(Plain(log_dir))
        if "langgraph" in systems_wanted:
            from bench.peers_langgraph import LangGraph, ensure_langgraph_venv

            binary, info = await asyncio.to_thread(ensure_langgraph_venv)
            if binary is None:
                notes.append(f"LangGraph: not measured — {info}")
            else:
                notes.append(f"LangGraph packages (bench/.peers/venv): {info}.")
                systems.append(LangGraph(binary, log_dir))
        for system in systems:
            try:
                results[system.name] = await measure(system, log_dir)
            except Exception as exc:
                say(f"[{system.name}] failed: {exc!r}")
                notes.append(f"{system.name}: failed — {exc!r} (log {system.proc.log_path})")
    say(f"logs in {log_dir}")
    rows, kills = [], []
    for name, r in results.items():
        rows.append(
            [
                name,
                ms(pct(r["ttfc1"], 50)),
                ms(pct(r["ttfc1"], 99)),
                ms(pct(r["ttfc10"], 50)),
                ms(pct(r["ttfc10"], 99)),
                f"{r['stream_rate']:,.0f}",
                f"{r['total_rate']:,.0f}",
                f"{r['complete']}/50",
                f"{r['rss'] / 1024:.0f} MiB",
            ]
        )
        kills.append([name, r["kill"]])
    return "\n\n".join(
        [
            "## Peers: same workload, same machine, same run",
            "TTFC = request written → first chunk read (threadgate: POST then attach; plain: "
            "one GET; LangGraph: POST /threads/{t}/runs/stream on an existing thread); 5-chunk "
            "replies, delay 0; 1 thread: 10 sequential turns; 10 threads: 6 bursts of 10. "
            "Throughput: 50 streams x 400 chunks at once, delay 0. Idle RSS after 3 warm-up "
            "turns (the server's whole process session).",
            table(
                [
                    "system",
                    "TTFC p50 @1",
                    "TTFC p99 @1",
                    "TTFC p50 @10",
                    "TTFC p99 @10",
                    "streaming chunks/s",
                    "total chunks/s",
                    "complete streams",
                    "idle RSS",
                ],
                rows,
            ),
            f"SIGKILL of the server during a run ({KILL_CHUNKS} chunks, {KILL_DELAY_MS} ms "
            f"apart, killed after chunk {KILL_AFTER}), then a restart:",
            table(["system", "what happened"], kills),
            *notes,
        ]
    )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="threadgate,plain,langgraph")
    args = ap.parse_args()
    print(run_async(lambda: main(set(args.systems.split(",")))))


if __name__ == "__main__":
    cli()
