"""The benchmarks' common ground: the embedded stack, pods as processes, numbers and tables.

Everything a bench starts is a real process on a loopback port: PostgreSQL and nats-server
from `threadgate.devstack`, pods as `python -m threadgate.cli serve` configured by environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from threadgate.devstack import NatsServer, Postgres, free_port, make_state_dir, nats_server_bin

from bench.sse import get

REPO = Path(__file__).resolve().parents[1]
SERVE = [sys.executable, "-m", "threadgate.cli", "serve"]


def say(*parts: object) -> None:
    """Progress goes to stderr; stdout carries only the bench's markdown."""
    print(*parts, file=sys.stderr, flush=True)


def use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# ---------------------------------------------------------------------------- the stack


class Stack:
    """PostgreSQL and nats-server in a fresh directory under /tmp, stopped and removed at exit."""

    def __init__(self, *, fast: bool = False) -> None:
        self.root = make_state_dir(Path(tempfile.mkdtemp(prefix="threadgate-bench-", dir="/tmp")))
        self.pg = Postgres(self.root / "pg", fast=fast, max_connections=400)
        self.nats = NatsServer(self.root / "nats")
        self.fast = fast

    def __enter__(self) -> Stack:
        t0 = time.monotonic()
        self.pg.start()
        self.nats.start()
        say(f"stack up in {time.monotonic() - t0:.1f}s ({self.root})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.nats.stop()
        self.pg.stop()
        if not os.environ.get("BENCH_KEEP_STATE"):
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def admin_url(self) -> str:
        return self.pg.url("postgres")

    def new_database(self, name: str) -> str:
        """An empty database for one pod configuration: its counters and queues are its own."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.pg.url(name)


class PgCounters:
    """Transaction counters of one database, read from another (so reading costs it nothing).

    `xact_commit` comes from the cumulative statistics, which a backend flushes at most once a
    second and, once idle, up to 10 s later: deltas need a settle time (`settle()`). The next
    transaction id counts write transactions cluster-wide, exactly and at once.
    """

    SETTLE_S = 11.0

    def __init__(self, admin_url: str, database: str) -> None:
        self.conn = psycopg.connect(admin_url, autocommit=True)
        self.database = database

    def read(self) -> tuple[int, int]:
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self.conn.execute(
            "SELECT xact_commit, pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
            " FROM pg_stat_database WHERE datname = %s",
            (self.database,),
        ).fetchone()
        assert row is not None, self.database
        return int(row[0]), int(row[1])

    def close(self) -> None:
        self.conn.close()


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


# ---------------------------------------------------------------------------- processes


def pod_env(
    database_url: str,
    nats_url: str,
    *,
    polling_s: float | None = 0.05,
    delay_ms: float = 0,
    **knobs: str | float | int,
) -> dict[str, str]:
    """The environment of a bench pod; the caller's THREADGATE_* never leak in.

    `polling_s` None: THREADGATE_QUEUE_POLLING_S unset, the pod's own default (the product's).
    """
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_") and k != "POD_NAME"
    }
    env.update(
        PYTHONUNBUFFERED="1",
        THREADGATE_HOST="127.0.0.1",
        THREADGATE_DATABASE_URL=database_url,
        THREADGATE_NATS_URL=nats_url,
        THREADGATE_MOCK_DELAY_MS=str(delay_ms),
        THREADGATE_LOG_LEVEL="WARNING",
    )
    if polling_s is not None:
        env["THREADGATE_QUEUE_POLLING_S"] = str(polling_s)
    env.update({f"THREADGATE_{k.upper()}": str(v) for k, v in knobs.items()})
    return env


@dataclass
class Proc:
    """A server process of a bench (a pod, a peer), ready when `ready_path` answers 200."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    ready_path: str = "/readyz"
    cwd: Path = REPO
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        assert not self.alive, f"{self.name} still runs"
        _SPAWNED.append(self)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from now until `ready_path` answers 200; fails at once if the process dies."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        delay = 0.02
        while True:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited before ready:\n{self.log_tail()}")
            with contextlib.suppress(OSError, asyncio.TimeoutError, ConnectionError):
                resp = await asyncio.wait_for(get(self.port, self.ready_path), 5)
                if resp.status == 200:
                    return loop.time() - t0
            if loop.time() - t0 > timeout:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s\n{self.log_tail()}")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    async def start(self, timeout: float = 120.0) -> float:
        self.spawn()
        return await self.wait_ready(timeout)

    def rss_kb(self) -> int:
        """RSS of the server's processes (a pod of several processes counts them all)."""
        return group_rss_kb(self.pid)

    def cpu_s(self) -> float:
        """CPU seconds of the server's process tree so far (each process of a pod)."""
        return proc_tree_cpu_s(self.pid)

    async def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait, 10)

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a pod drains), then SIGKILL if it lingers."""
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            await self.kill()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def pod(
    name: str,
    env: Mapping[str, str],
    log_dir: Path,
    cmd: Sequence[str] = SERVE,
    tree: Path | None = None,
) -> Proc:
    """A `threadgate serve` process (or a bench wrapper of it) named `name` on a free port.

    `tree`: run the `app/` package found there (see `tree_at`) instead of this checkout's.
    """
    port = free_port()
    full = {**env, "POD_NAME": name, "THREADGATE_PORT": str(port)}
    if tree is None:
        return Proc(name, list(cmd), full, log_dir / f"{name}.log", port=port)
    full["PYTHONPATH"] = str(tree)  # ahead of the editable install's finder
    # An unpacked tree is the bare `app/` directory: it runs as the package `app`, whatever
    # name this checkout installs it under.
    cmd = [c if c != "threadgate.cli" else "app.cli" for c in cmd]
    return Proc(name, list(cmd), full, log_dir / f"{name}.log", port=port, cwd=tree)


def tree_at(rev: str) -> tuple[str, Path]:
    """This repository's `app/` as of git revision `rev`, unpacked under /tmp (once per
    commit): a before/after comparison runs both versions as pods in the same bench run."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"threadgate-tree-{sha}"
    if not (dest / "app").is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=f"threadgate-tree-{sha}-"))
        archive = subprocess.run(
            ["git", "archive", sha, "app"], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(dest)
    return sha, dest


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_tree_cpu_s(pid: int) -> float:
    """CPU seconds of a server and its children, living and exited (PostgreSQL's backends):
    its own time, its reaped children's (cutime, cstime) and each live child's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(f[1]) == pid:  # parent pid
                total += proc_cpu_s(int(d.name))
    return total


def group_rss_kb(pid: int) -> int:
    """RSS of a process and every process in its session (a server may fork workers)."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == pid or int(d.name) == pid:  # session id = the leader's pid
                total += proc_rss_kb(int(d.name))
    return total


async def kill_group(p: Proc) -> None:
    if p.alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        assert p.proc is not None
        await asyncio.to_thread(p.proc.wait, 10)


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` shows them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------- the machine


def busy_ticks() -> int:
    """CPU ticks spent by the whole machine so far (all CPUs, not idle or iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def our_ticks() -> int:
    """CPU ticks spent so far by this process and every process under it (the stack, pods)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(stat[1]), []).append(int(entry.name))
        ticks[int(entry.name)] = int(stat[11]) + int(stat[12])
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total


class Others:
    """CPU that processes outside this bench use (cores), measured between two looks: on a
    shared machine it takes CPU from the pod and shows as lag."""

    def __init__(self) -> None:
        self.at, self.busy, self.ours = time.monotonic(), busy_ticks(), our_ticks()

    def cores(self) -> float:
        seconds = time.monotonic() - self.at
        other = (busy_ticks() - self.busy) - (our_ticks() - self.ours)
        return max(other, 0) / os.sysconf("SC_CLK_TCK") / max(seconds, 1e-3)


async def calm(max_wait_s: float, below: float = 0.3) -> float:
    """Wait (up to `max_wait_s`) until other processes use less than `below` cores over 3 s;
    what they used over the last look."""
    deadline = time.monotonic() + max_wait_s
    while True:
        look = Others()
        await asyncio.sleep(3)
        other = look.cores()
        if other < below or time.monotonic() > deadline:
            return other
        say(f"waiting for a calm machine: others use {other:.2f} cores")


def cpu_busy(seconds: float = 3.0) -> float:
    """Share of all CPUs busy over `seconds` (anything running: other sessions included)."""

    def snap() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit_s: float, threshold: float = 0.25) -> float:
    """Wait (up to `limit_s`) until the machine is mostly idle; returns the last busy share."""
    deadline = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        say(f"machine {busy * 100:.0f} % busy before the run; waiting for quiet ...")
        busy = cpu_busy(10.0)
    return busy


# ---------------------------------------------------------------------------- numbers


def pct(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no samples."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def ms(x: float, digits: int = 1) -> str:
    return "—" if math.isnan(x) else f"{x * 1000:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def machine() -> dict[str, str]:
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )

    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except Exception as exc:
            return f"? ({exc.__class__.__name__})"

    from importlib.metadata import version as pkg

    from threadgate.devstack import pg_bin_dir

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": version([str(pg_bin_dir() / "postgres"), "--version"]),
        "nats-server": version([str(nats_server_bin()), "--version"]),
        "packages": ", ".join(
            f"{n} {pkg(n)}" for n in ("dbos", "nats-py", "fastapi", "uvicorn", "uvloop")
        ),
        "load before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


_SPAWNED: list[Proc] = []


def run_async(main: Callable[[], Any]) -> Any:
    """Run a bench's main; whatever it leaves running (a failed bench) is killed at the end."""
    use_uvloop()
    try:
        return asyncio.run(main())
    finally:
        for p in _SPAWNED:
            if p.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
