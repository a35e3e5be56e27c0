"""LangGraph's agent server on its Postgres+Redis runtime, set up by the bench as a peer.

The server is stock `langgraph-api` (0.11.1) with `langgraph-runtime-pg` (0.11.1.post1, the MIT
runtime it selects with LANGGRAPH_RUNTIME_EDITION=pg), both from the package index into their
own virtualenv, bench/.peers/venv-pg (gitignored; never threadgate's). What the installed
packages read (langgraph_runtime/__init__.py, langgraph_runtime_pg/database.py,
langgraph_runtime_pg/redis_stream.py, langgraph_api/config):

- LANGGRAPH_RUNTIME_EDITION=pg imports `langgraph_runtime_pg` as the runtime;
- DATABASE_URI (its own database; Alembic migrations run at start-up), REDIS_URI;
- LANGSERVE_GRAPHS = {"mock": "<dir>/graph.py:graph"} (bench/peer_langgraph/graph.py, the
  mock model streaming `custom` events, as the in-memory peer);
- no licence check runs: langgraph-api ships `langgraph_license` as a no-op, and its metadata
  loop returns at once when neither LANGGRAPH_CLOUD_LICENSE_KEY nor LANGSMITH_API_KEY is set.
  Nothing reaches outside the machine.

One process: `python -m uvicorn langgraph_api.server:app` (what `langgraph dev` runs, without
its reloader), ready when GET /ok answers. Runs queue in Postgres; an idle server's queue loop
claims (`SELECT ... FOR UPDATE SKIP LOCKED`) every 0.5 s or at once on a Redis wake-up that
each new run publishes; run events go through Redis streams. Redis is Debian's `redis-server`,
installed here with apt-get when it is missing and we run as root.
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
import uuid
from pathlib import Path
from typing import Any

from bench.harness import REPO, Proc, Stack, database_name, free_port, say
from bench.rigs import CHUNKS, Rig, Sample
from bench.sse import HttpConn, attach

PEERS = REPO / "bench" / ".peers"
VENV = PEERS / "venv-pg"
PACKAGES = {"langgraph-api": "0.11.1", "langgraph-runtime-pg": "0.11.1.post1"}
REPORTED = ("langgraph", "langgraph-api", "langgraph-runtime-pg", "langgraph-checkpoint-postgres")


def ensure_venv() -> tuple[Path | None, str]:
    """The peer's virtualenv with the pinned packages; (its python, versions) or (None, why)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        say(f"creating {VENV} ...")
        PEERS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    versions = _installed(python)
    if any(versions.get(n) != v for n, v in PACKAGES.items()):
        wanted = [f"{n}=={v}" for n, v in PACKAGES.items()]
        say(f"installing {' '.join(wanted)} into {VENV} ...")
        pip = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *wanted], capture_output=True, text=True
        )
        if pip.returncode != 0:
            lines = [x for x in (pip.stderr or pip.stdout).splitlines() if "WARNING" not in x]
            return None, "pip install failed: " + " ".join(lines[-5:])
        versions = _installed(python)
    return python, ", ".join(f"{n} {versions.get(n, '?')}" for n in REPORTED)


def _installed(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True
    )
    if out.returncode != 0:
        return {}
    return {p["name"].lower(): p["version"] for p in json.loads(out.stdout)}


def ensure_redis() -> tuple[Path | None, str]:
    """Debian's redis-server: found, or installed with apt-get as root; (binary, version)."""
    found = shutil.which("redis-server")
    if found is None:
        if os.geteuid() != 0:
            return None, (
                "redis-server is not installed and this is not root: "
                "`sudo apt-get install redis-server`, then run the bench again"
            )
        say("installing redis-server with apt-get ...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "redis-server"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            done = subprocess.run(install, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                return None, "apt-get install redis-server failed: " + done.stderr[-300:]
        found = shutil.which("redis-server")
        if found is None:
            return None, "apt-get installed redis-server but it is not on PATH"
    out = subprocess.run([found, "--version"], capture_output=True, text=True).stdout.split()
    version = next((w.split("=", 1)[1] for w in out if w.startswith("v=")), "?")
    return Path(found), f"redis-server {version}"


class Redis:
    """One redis-server on a loopback port, no persistence, its files in `root` (a harness Proc:
    killed at the bench's exit if it is left running)."""

    def __init__(self, binary: Path, root: Path, log_dir: Path) -> None:
        port = free_port()
        data = root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(binary),
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
        ]
        self.proc = Proc("redis", cmd, dict(os.environ), log_dir / "redis.log", port=port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.proc.port}/0"

    async def start(self, timeout: float = 20.0) -> None:
        self.proc.spawn()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.proc.port)
                writer.write(b"PING\r\n")
                line = await asyncio.wait_for(reader.readline(), 2)
                writer.close()
                if line.startswith(b"+PONG"):
                    return
            if not self.proc.alive or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{self.proc.log_tail()}")
            await asyncio.sleep(0.05)

    def cpu_s(self) -> float:
        return self.proc.cpu_s()


class LangGraphPg:
    """The agent server (one uvicorn process) on a database of its own and its own Redis."""

    assistant = "mock"

    def __init__(self, python: Path, redis_bin: Path, stack: Stack, log_dir: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="threadgate-peer-lgpg-", dir="/tmp"))
        shutil.copy(REPO / "bench" / "peer_langgraph" / "graph.py", self.dir / "graph.py")
        self.database_url = stack.new_database(f"langgraph_{uuid.uuid4().hex[:6]}")
        self.database = database_name(self.database_url)
        self.redis = Redis(redis_bin, self.dir, log_dir)
        port = free_port()
        cmd = [
            str(python),
            *("-m", "uvicorn", "langgraph_api.server:app"),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "warning", "--no-access-log"),
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("THREADGATE_", "VIRTUAL_ENV", "PYTHON", "LANGSMITH", "LANGCHAIN"))
        }
        env.update(
            LANGGRAPH_RUNTIME_EDITION="pg",
            DATABASE_URI=self.database_url,
            REDIS_URI=self.redis.url,
            LANGSERVE_GRAPHS=json.dumps({self.assistant: f"{self.dir}/graph.py:graph"}),
            LANGSMITH_TRACING="false",
            LANGCHAIN_TRACING_V2="false",
            LANGGRAPH_CLI_NO_ANALYTICS="1",
            LANGGRAPH_NO_VERSION_CHECK="true",
            LOG_LEVEL="WARNING",
        )
        self.proc = Proc("langgraph-pg", cmd, env, log_dir / "langgraph-pg.log", port=port)
        self.proc.ready_path = "/ok"
        self.proc.cwd = self.dir

    async def start(self) -> float:
        await self.redis.start()
        return await self.proc.start(timeout=180)

    async def stop(self) -> None:
        await self.proc.stop()
        await self.redis.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def new_thread(self, conn: HttpConn) -> str:
        resp = await conn.request("POST", "/threads", {})
        if resp.status != 200:
            raise RuntimeError(f"POST /threads {resp.status}: {resp.body[:300]!r}")
        return str(resp.json()["thread_id"])

    def body(self, chunks: int, delay_ms: float = 0, **extra: Any) -> dict[str, Any]:
        return {
            "assistant_id": self.assistant,
            "input": {"chunks": chunks, "delay_ms": delay_ms},
            "stream_mode": ["custom"],
            **extra,
        }


# ---------------------------------------------------------------------------- as a ttfc rig

SHAPES = {
    "join": "POST /runs then attach (join)",  # threadgate's shape: a background run, then its stream
    "stream": "one request (POST /runs/stream)",
}


class LangGraphTurns:
    """One LangGraph thread (made before the clock starts); a turn as `shape` says."""

    def __init__(self, server: LangGraphPg, shape: str, port: int) -> None:
        self.server, self.shape, self.port = server, shape, port
        self.conn: HttpConn | None = None
        self.thread = ""

    async def prepare(self) -> None:
        self.conn = await HttpConn.open(self.port)
        self.thread = await self.server.new_thread(self.conn)

    async def turn(self, chunks: int = CHUNKS, cold: bool = False, delay_ms: float = 0) -> Sample:
        if self.conn is None or self.conn.lost.done():
            self.conn = await HttpConn.open(self.port)
        # enqueue, as threadgate's default: LangGraph's own default (reject) answers 409 while
        # the thread's previous run is still being finalized.
        body = self.server.body(chunks, delay_ms, multitask_strategy="enqueue")
        wall0, t0 = time.time(), time.perf_counter()
        t_post, run_id = float("nan"), ""
        if self.shape == "join":
            resp = await self.conn.request(
                "POST", f"/threads/{self.thread}/runs", {**body, "stream_resumable": True}
            )
            t_post = time.perf_counter()
            if resp.status != 200:
                raise RuntimeError(f"POST /runs {resp.status}: {resp.body[:300]!r}")
            run_id = resp.json()["run_id"]
            path = f"/threads/{self.thread}/runs/{run_id}/stream"
            stream, sconn = await attach(self.port, path, chunk_event="custom", done_event=None)
        else:
            path = f"/threads/{self.thread}/runs/stream"
            stream, sconn = await attach(
                self.port, path, method="POST", body=body, chunk_event="custom", done_event=None
            )
        try:
            assert stream.finished is not None
            # A streaming phase queues runs behind others (LangGraph runs 10 at a time).
            await asyncio.wait_for(stream.finished, 60 + 10 * chunks * delay_ms / 1000)
        finally:
            sconn.close()
        got = sum(1 for _, ev, _ in stream.events if ev == "custom")
        if stream.status != 200 or stream.first_chunk is None or got != chunks:
            raise RuntimeError(f"{path}: HTTP {stream.status}, {got} of {chunks} chunks")
        return Sample(self.thread, run_id, wall0, stream.first_chunk - t0, t_post - t0, cold)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class LangGraphRig(Rig):
    system = "LangGraph pg"
    ready_path = "/ok"
    with_breakdown = False

    def __init__(self, server: LangGraphPg, stack: Stack, shape: str) -> None:
        self.server, self.shape = server, shape
        super().__init__(stack, f"LangGraph pg, {SHAPES[shape]}", server.proc, server.database_url)

    def make(self, port: int, thread: str) -> LangGraphTurns:
        return LangGraphTurns(self.server, self.shape, port)

    def broker_cpu_s(self) -> float:
        return self.server.redis.cpu_s()

    async def start(self) -> float:
        return await self.server.start()

    async def close(self) -> None:
        self.pc.close()
        await self.server.stop()


async def langgraph_rigs(
    stack: Stack, log_dir: Path, shapes: list[str]
) -> tuple[list[LangGraphRig], str]:
    """A LangGraph pg server per client shape (its own database and Redis), or none and why."""
    python, versions = await asyncio.to_thread(ensure_venv)
    if python is None:
        return [], f"LangGraph pg: not measured — {versions}"
    redis_bin, redis = await asyncio.to_thread(ensure_redis)
    if redis_bin is None:
        return [], f"LangGraph pg: not measured — {redis}"
    rigs = []
    for shape in shapes:
        server = LangGraphPg(python, redis_bin, stack, log_dir / shape)
        rigs.append(LangGraphRig(server, stack, shape))
    note = (
        f"LangGraph pg (bench/.peers/venv-pg): {versions}; {redis}; one uvicorn process per "
        "client shape, each with its own database and Redis; N_JOBS_PER_WORKER at its default "
        "(10); runs with multitask_strategy=enqueue."
    )
    return rigs, note
