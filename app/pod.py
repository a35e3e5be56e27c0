"""A pod of several executing processes: one listening socket, an executor id each, and the
pod's own probes, drain and metrics.

One Python process runs one event loop on one core; a pod with THREADGATE_PROCESSES=N runs N
`threadgate serve` processes behind this supervisor. They share the API port (the supervisor
binds it and each process accepts on it, so a process that dies only stops taking
connections), and each is a full pod process under its own executor id: the first keeps
POD_NAME, the others are POD_NAME-1 .. POD_NAME-(N-1). Each takes its name's fencing claim
and recovers its own name's runs when it starts; a process that dies is started again under
its name (its runs continue there), like a StatefulSet does for a pod.

The pod as a whole answers on its admin port (THREADGATE_METRICS_PORT, else the API port + 1):
/healthz (every process started and none crash-looping), /readyz (one process at least is
ready, and the pod is not draining) and /metrics (every process's, each sample labelled with
its `executor`). SIGTERM drains every process and exits when they have all exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from .devstack import free_port
from .settings import Settings

logger = logging.getLogger(__name__)

RESTART_FIRST_S = 0.5  # a dead process is started again after this, doubling while it
RESTART_CAP_S = 30.0  # keeps dying young,
HEALTHY_S = 60.0  # back to the first delay once a process lived this long.
CRASH_LOOP = 5  # restarts in a row without a healthy run: /healthz says so (kubelet restarts)
PROBE_TIMEOUT_S = 2.0


def executor_name(pod_name: str, index: int) -> str:
    """Process 0 keeps the pod's name (a single-process pod's runs are its runs), the others
    get a suffix: never a name another pod of a StatefulSet could have (theirs end in digits
    after the set's own name, ours after the pod's)."""
    return pod_name if index == 0 else f"{pod_name}-{index}"


@dataclass
class Process:
    index: int
    name: str
    admin_port: int  # its own /healthz, /readyz, /metrics on 127.0.0.1
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    starts: int = 0
    crashes: int = 0  # in a row, each without a healthy run
    delay: float = 0.0
    ready_once: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class PodSupervisor:
    def __init__(self, settings: Settings, module: str) -> None:
        self.settings = settings
        self.module = module  # `threadgate.cli` (or `app.cli` in an unpacked tree)
        n = settings.processes
        self.processes = [
            Process(k, executor_name(settings.pod_name, k), free_port()) for k in range(n)
        ]
        self.draining = False
        self.sock: socket.socket | None = None
        self._stopped = asyncio.Event()

    # -- processes

    def _env(self, p: Process) -> dict[str, str]:
        assert self.sock is not None
        env = dict(os.environ)
        env.update(
            POD_NAME=p.name,
            THREADGATE_PROCESSES="1",
            THREADGATE_LISTEN_FD=str(self.sock.fileno()),
            THREADGATE_METRICS_PORT=str(p.admin_port),
            THREADGATE_METRICS_HOST="127.0.0.1",
        )
        return env

    async def _spawn(self, p: Process) -> None:
        assert self.sock is not None
        p.starts += 1
        p.started_at = time.monotonic()
        p.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            "serve",
            env=self._env(p),
            pass_fds=(self.sock.fileno(),),
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_pod,  # the supervisor runs no threads
        )
        logger.info(
            "process %s started (pid %d)", p.name, p.proc.pid, extra={"pod": self.settings.pod_name}
        )
        p.watcher = asyncio.create_task(self._watch(p))

    async def _watch(self, p: Process) -> None:
        """Wait for the process to exit; start it again under its name unless the pod drains."""
        assert p.proc is not None
        code = await p.proc.wait()
        if self.draining:
            return
        lived = time.monotonic() - p.started_at
        p.crashes = 0 if lived >= HEALTHY_S else p.crashes + 1
        p.delay = (
            RESTART_FIRST_S
            if lived >= HEALTHY_S or not p.delay
            else min(p.delay * 2, RESTART_CAP_S)
        )
        logger.error(
            "process %s exited with %s after %.1fs: started again in %.1fs (its runs recover there)",
            p.name,
            code,
            lived,
            p.delay,
            extra={"pod": self.settings.pod_name},
        )
        await asyncio.sleep(p.delay)
        if not self.draining:
            await self._spawn(p)

    # -- the pod's probes and metrics

    async def _child(self, p: Process, path: str) -> tuple[int, bytes]:
        """GET a path of one process's admin server: (status, body); (0, b"") if it is down."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", p.admin_port), PROBE_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            return 0, b""
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n".encode())
            raw = await asyncio.wait_for(reader.read(), PROBE_TIMEOUT_S)
        except (OSError, TimeoutError):
            return 0, b""
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        try:
            return int(head.split(b" ", 2)[1]), body
        except (IndexError, ValueError):
            return 0, b""

    async def healthz(self) -> tuple[int, dict[str, object]]:
        """Alive: every process has started once and none is crash-looping, and each live one
        answers its own /healthz (a dead queue worker is only mended by a restart)."""
        answers = await asyncio.gather(*(self._child(p, "/healthz") for p in self.processes))
        procs: dict[str, object] = {}
        ok = True
        for p, (status, _) in zip(self.processes, answers, strict=True):
            if status == 200:
                p.ready_once = True
            healthy = p.crashes < CRASH_LOOP and p.ready_once and status in (200, 0)
            ok = ok and healthy and (status == 200 or not p.alive)
            procs[p.name] = {"status": status, "starts": p.starts, "crashes": p.crashes}
        return (200 if ok else 503), {"status": "ok" if ok else "unhealthy", "processes": procs}

    async def readyz(self) -> tuple[int, dict[str, object]]:
        """Ready: not draining, and at least one process takes connections and is ready."""
        answers = await asyncio.gather(*(self._child(p, "/readyz") for p in self.processes))
        procs: dict[str, object] = {}
        checks: dict[str, bool] = {}
        ready = 0
        for p, (status, body) in zip(self.processes, answers, strict=True):
            if status == 200:
                ready += 1
            doc: dict[str, object] = {"status": "down"}
            with contextlib.suppress(ValueError):
                doc = json.loads(body) if body else doc
            doc["pid"] = p.proc.pid if p.alive and p.proc is not None else None
            procs[p.name] = doc
            found = doc.get("checks")
            if status == 200 and isinstance(found, dict):
                for name, value in found.items():
                    checks[name] = checks.get(name, True) and bool(value)
        ok = ready > 0 and not self.draining
        state = (
            "draining"
            if self.draining
            else "not_ready"
            if not ok
            else "ready"
            if all(checks.values())
            else "degraded"
        )
        return (200 if ok else 503), {
            "status": state,
            "pod": self.settings.pod_name,
            "ready": ready,
            "checks": checks,  # each check of the ready processes, all of them true
            "processes": procs,
        }

    async def metrics(self) -> bytes:
        from prometheus_client.parser import text_string_to_metric_families

        answers = await asyncio.gather(*(self._child(p, "/metrics") for p in self.processes))
        # One HELP and TYPE per exposed name, as prometheus_client writes them: a counter's
        # samples are `<name>_total` (a counter) and `<name>_created` (a gauge).
        declared: dict[str, tuple[str, str]] = {}
        samples: dict[str, list[str]] = {}
        for p, (status, body) in zip(self.processes, answers, strict=True):
            if status != 200:
                continue
            for fam in text_string_to_metric_families(body.decode(errors="replace")):
                for sm in fam.samples:
                    if fam.type == "counter":
                        name = sm.name
                        kind = "gauge" if name.endswith("_created") else "counter"
                    else:
                        name, kind = fam.name, fam.type
                    declared.setdefault(name, (fam.documentation, kind))
                    labels = {**sm.labels, "executor": p.name}
                    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                    samples.setdefault(name, []).append(f"{sm.name}{{{inner}}} {_number(sm.value)}")
        out: list[str] = [
            "# HELP threadgate_pod_processes_ready Processes of this pod ready for traffic.",
            "# TYPE threadgate_pod_processes_ready gauge",
            f"threadgate_pod_processes_ready {(await self.readyz())[1]['ready']}",
            "# HELP threadgate_pod_process_starts_total Processes started, restarts included.",
            "# TYPE threadgate_pod_process_starts_total counter",
        ]
        out += [
            f'threadgate_pod_process_starts_total{{executor="{p.name}"}} {p.starts}'
            for p in self.processes
        ]
        for name, (doc, kind) in declared.items():
            out += [f"# HELP {name} {_escape(doc, help_text=True)}", f"# TYPE {name} {kind}"]
            out += samples[name]
        return ("\n".join(out) + "\n").encode()

    async def _serve_admin(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT_S)
            while (await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT_S)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass
            parts = line.decode(errors="replace").split()
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else ""
            if path == "/metrics":
                status, body, kind = 200, await self.metrics(), "text/plain; version=0.0.4"
            elif path in ("/healthz", "/readyz"):
                status, doc = await (self.healthz() if path == "/healthz" else self.readyz())
                body, kind = json.dumps(doc).encode(), "application/json"
            else:
                status, body, kind = 404, b'{"error":{"code":"not_found"}}', "application/json"
            reason = {200: "OK", 404: "Not Found"}.get(status, "Service Unavailable")
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    # -- the pod's life

    def _drain(self) -> None:
        """SIGTERM: every process drains (its runs get the drain timeout), none is restarted."""
        if self.draining:
            return
        self.draining = True
        logger.info("draining: every process drains", extra={"pod": self.settings.pod_name})
        for p in self.processes:
            if p.alive and p.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.send_signal(signal.SIGTERM)
        self._stopped.set()

    async def run(self) -> int:
        s = self.settings
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((s.host, s.port))
        self.sock.listen(2048)
        self.sock.set_inheritable(True)
        admin_port = s.metrics_port or s.port + 1
        admin = await asyncio.start_server(self._serve_admin, s.host, admin_port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._drain)
        logger.info(
            "pod of %d processes on port %d (admin %d)",
            len(self.processes),
            s.port,
            admin_port,
            extra={"pod": s.pod_name},
        )
        try:
            for p in self.processes:
                await self._spawn(p)
            await self._stopped.wait()
            codes = [await p.proc.wait() for p in self.processes if p.proc is not None]
        finally:
            admin.close()
            self.sock.close()
            for p in self.processes:
                if p.alive and p.proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        p.proc.kill()
        logger.info("pod stopped: %s", codes, extra={"pod": s.pod_name})
        return 0 if all(c == 0 for c in codes) else 1


def _die_with_pod() -> None:
    """In a process, before exec: killed when the supervisor dies, SIGKILL included (a pod
    dies whole: its processes must not hold their names behind a supervisor that is gone)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)


def _escape(value: str, *, help_text: bool = False) -> str:
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value if help_text else value.replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
