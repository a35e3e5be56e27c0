"""The LangGraph peer: its own virtualenv under bench/.peers/ and `langgraph dev` driven like a pod.

`langgraph dev` is LangGraph's agent server (langgraph-api) on its in-memory runtime, which
keeps threads and runs in memory and flushes them to `.langgraph_api/` in its working directory
every 10 s. The graph is bench/peer_langgraph/graph.py. Nothing here is a dependency of
threadgate: the packages live in bench/.peers/venv (gitignored), made on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from threadgate.models.mock import mock_reply

from bench.harness import REPO, Proc, free_port, kill_group, say
from bench.rigs import KILL_AFTER, KILL_CHUNKS, KILL_DELAY_MS, System, Turn
from bench.sse import HttpConn, Stream, attach, get

PEERS = REPO / "bench" / ".peers"
VENV = PEERS / "venv"
LANGGRAPH_PACKAGES = ["langgraph-api", "langgraph-cli[inmem]"]


def ensure_langgraph_venv() -> tuple[Path | None, str]:
    """The peer's own virtualenv (never threadgate's); (langgraph binary, versions or error)."""
    lg = VENV / "bin" / "langgraph"
    if not lg.exists():
        say(f"creating {VENV} and installing {' '.join(LANGGRAPH_PACKAGES)} ...")
        PEERS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", *LANGGRAPH_PACKAGES],
            capture_output=True,
            text=True,
        )
        if pip.returncode != 0 or not lg.exists():
            lines = [x for x in (pip.stderr or pip.stdout).splitlines() if "WARNING" not in x]
            return None, "pip install failed: " + " ".join(lines[-5:])
    out = subprocess.run(
        [str(VENV / "bin" / "pip"), "list", "--format=json"], capture_output=True, text=True
    )
    versions = {p["name"]: p["version"] for p in json.loads(out.stdout)}
    wanted = ("langgraph", "langgraph-api", "langgraph-runtime-inmem", "langgraph-cli")
    return lg, ", ".join(f"{n} {versions.get(n, '?')}" for n in wanted)


class LangGraph(System):
    name = "LangGraph (langgraph dev, in-memory)"

    def __init__(self, binary: Path, log_dir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="threadgate-peer-lg-", dir="/tmp"))
        for f in ("graph.py", "langgraph.json"):
            shutil.copy(REPO / "bench" / "peer_langgraph" / f, self.dir / f)
        port = free_port()
        cmd = [
            str(binary),
            "dev",
            "--no-browser",
            "--no-reload",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n-jobs-per-worker",
            "64",
            "--server-log-level",
            "WARNING",
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("THREADGATE_", "VIRTUAL_ENV", "PYTHON"))
        }
        env.update(
            LANGGRAPH_CLI_NO_ANALYTICS="1", LANGSMITH_TRACING="false", LANGCHAIN_TRACING_V2="false"
        )
        self.proc = Proc(
            "langgraph", cmd, env, log_dir / "langgraph.log", port=port, ready_path="/ok"
        )
        self.proc.cwd = self.dir

    async def start(self) -> None:
        await self.proc.start()

    async def stop(self) -> None:
        await self.proc.stop()
        await kill_group(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    async def conversation(self) -> str:
        conn = await HttpConn.open(self.proc.port)
        resp = await conn.request("POST", "/threads", {})
        conn.close()
        return str(resp.json()["thread_id"])

    def body(self, chunks: int, delay_ms: float, **extra: Any) -> dict[str, Any]:
        return {
            "assistant_id": "mock",
            "input": {"chunks": chunks, "delay_ms": delay_ms},
            "stream_mode": ["custom"],
            **extra,
        }

    def chunk_count(self, s: Stream) -> int:
        return sum(1 for _, ev, _ in s.events if ev == "custom")

    async def turn(self, conv: str, chunks: int, delay_ms: float) -> Turn:
        t0 = time.perf_counter()
        stream, conn = await attach(
            self.proc.port,
            f"/threads/{conv}/runs/stream",
            method="POST",
            body=self.body(chunks, delay_ms),
            chunk_event="custom",
            done_event=None,
        )
        assert stream.finished is not None
        await asyncio.wait_for(stream.finished, 120)
        conn.close()
        assert stream.first_chunk is not None, stream.events[:3]
        return Turn(stream.first_chunk - t0, stream)

    async def kill_test(self) -> str:
        port = self.proc.port
        thread = await self.conversation()
        conn = await HttpConn.open(port)
        resp = await conn.request(
            "POST",
            f"/threads/{thread}/runs",
            self.body(KILL_CHUNKS, KILL_DELAY_MS, stream_resumable=True),
        )
        conn.close()
        run_id = resp.json()["run_id"]
        seen = asyncio.Event()
        last: list[str | None] = [None]

        def on_event(t: float, ev: str, data: bytes, eid: str | None) -> None:
            last[0] = eid or last[0]
            if ev == "custom" and json.loads(data)["index"] >= KILL_AFTER:
                seen.set()

        stream, sconn = await attach(
            port,
            f"/threads/{thread}/runs/{run_id}/stream",
            on_event=on_event,
            chunk_event="custom",
            done_event=None,
        )
        await asyncio.wait_for(seen.wait(), 60)
        await kill_group(self.proc)
        sconn.close()
        before = self.chunk_count(stream)
        t_kill = time.monotonic()
        await self.proc.start()
        conn = await HttpConn.open(port)
        run = await conn.request("GET", f"/threads/{thread}/runs/{run_id}")
        after_restart = run.json().get("status") if run.status == 200 else f"HTTP {run.status}"
        headers = {"Last-Event-ID": last[0]} if last[0] else {}
        again, aconn = await attach(
            port,
            f"/threads/{thread}/runs/{run_id}/stream",
            headers=headers,
            chunk_event="custom",
            done_event=None,
        )
        with contextlib.suppress(TimeoutError, ConnectionError):
            assert again.finished is not None
            await asyncio.wait_for(again.finished, 30)
        aconn.close()
        rejoined = self.chunk_count(again)
        conn.close()  # idle for a while: the server may have closed it
        final = await get(port, f"/threads/{thread}/runs/{run_id}")
        final_status = final.json().get("status") if final.status == 200 else final.status
        state = await get(port, f"/threads/{thread}/state")
        reply = (state.json().get("values") or {}).get("reply") if state.status == 200 else None
        took = time.monotonic() - t_kill
        kinds = ", ".join(sorted({e for _, e, _ in again.events})) or "none"
        return (
            f"client had {before} chunks at the kill; after restart the run was "
            f"'{after_restart}', rejoining its stream (Last-Event-ID) gave {rejoined} chunk "
            f"events (event types: {kinds}); {took:.0f} s later the run is "
            f"'{final_status}' and the thread's reply is "
            + (
                "complete"
                if reply == mock_reply(KILL_CHUNKS)
                else "absent"
                if not reply
                else "partial"
            )
        )
