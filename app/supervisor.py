"""`threadgate dev`'s supervisor: the embedded servers and N pods, restarted like a StatefulSet.

A pod that dies is logged with its exit status and started again under the same name and port
(1 s, doubling on a crash loop up to 30 s, back to 1 s after a healthy minute); Ctrl-C, SIGTERM
or SIGHUP stops the pods (their drain), then nats-server, then PostgreSQL. The servers
themselves are app/devstack.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .devstack import NatsServer, Postgres, free_port, make_state_dir, wait_for

RESTART_FIRST_S = 1.0  # a dead pod is started again after 1 s, doubling on a crash loop,
RESTART_CAP_S = 30.0  # up to 30 s,
HEALTHY_S = 60.0  # back to 1 s once a process has lived a minute.
POD_STOP_S = 60.0  # a pod's drain on SIGTERM is 25 s by default: SIGKILL after this.
POD_TITLE = "threadgate serve {name}"  # the pods' process title (`ps`, `threadgate dev kill`)


class DevError(Exception):
    """Why `threadgate dev` cannot go on, in one line, with its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class _Interrupted(BaseException):
    """Ctrl-C or SIGTERM while the stack was starting."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def restart_delay(previous: float, lived: float) -> float:
    """How long to wait before starting a dead pod again: 1 s, doubling while it keeps dying
    young, at most 30 s; back to 1 s once a process has lived a healthy minute."""
    if lived >= HEALTHY_S or not previous:
        return RESTART_FIRST_S
    return min(previous * 2, RESTART_CAP_S)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def check_ports(pods: int, port: int, pg_port: int, nats_port: int) -> None:
    """Refuse ports that are taken, before anything starts; suggest a free range."""
    if pods < 1:
        raise DevError(f"--pods must be at least 1 (got {pods})", 2)
    if port:
        wanted = range(port, port + pods)
        if not 0 < port <= 65535 - pods:
            raise DevError(f"--port {port} is not a port for {pods} pod(s)", 2)
        taken = [p for p in wanted if not _port_free(p)]
        if taken:
            hint = next(
                (
                    base
                    for base in range(port + 100, 65535 - pods, 100)
                    if all(_port_free(p) for p in range(base, base + pods))
                ),
                0,
            )
            what = f"port {taken[0]} is in use" if len(taken) == 1 else f"ports {taken} are in use"
            raise DevError(f"{what}; try --port {hint or 0}", 2)
    for flag, value in (("--pg-port", pg_port), ("--nats-port", nats_port)):
        if value and not _port_free(value):
            raise DevError(f"port {value} is in use ({flag}); try {flag} 0 (any free port)", 2)


def _die_with_parent() -> None:
    """In a pod's process, before exec: SIGTERM when the supervisor dies (even SIGKILLed)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


class _Pod:
    """One pod name and port, like a StatefulSet member; `proc` is its current process."""

    def __init__(self, name: str, port: int, env: dict[str, str]) -> None:
        self.name, self.port, self.env = name, port, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # time.monotonic() of the current process's start
        self.delay = 0.0  # the last restart delay (0: none yet)
        self.restart_at: float | None = None
        self.announce = False  # say when it is ready again
        self.pidfd: int | None = None

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def spawn(self) -> None:
        env = {**self.env, "POD_NAME": self.name, "THREADGATE_PORT": str(self.port)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "threadgate.cli", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            # Not in the terminal's process group: Ctrl-C reaches the supervisor only, which
            # stops the pods with SIGTERM (a drain), in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,  # no threads here: the supervisor has none
        )
        self.started = time.monotonic()
        self.restart_at = None
        self.pidfd = None
        with contextlib.suppress(AttributeError, OSError):
            self.pidfd = os.pidfd_open(self.proc.pid)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class DevStack:
    """`threadgate dev`: PostgreSQL, nats-server and N pods; a pod that dies is started again
    under its name and port (1 s doubling to 30 s on a crash loop, reset after a healthy
    minute); Ctrl-C or SIGTERM stops the pods (SIGTERM: they drain), then nats-server, then
    PostgreSQL. Writes `urls` (once every pod is ready) and `pods.json` in the state dir."""

    def __init__(
        self, state: Path, *, pods: int, port: int, pg_port: int = 0, nats_port: int = 0
    ) -> None:
        self.state_arg = Path(state)
        self.n, self.port, self.pg_port, self.nats_port = pods, port, pg_port, nats_port
        self.pods: list[_Pod] = []
        self.pg: Postgres | None = None
        self.nats: NatsServer | None = None
        self.starting = True
        self.stopping = False
        self.hurry = False
        self.lock_fd: int | None = None

    # -- output: one line per event, to stdout (the pods log to stderr)
    def say(self, line: str) -> None:
        print(f"threadgate dev: {line}", flush=True)

    # -- files in the state dir
    @property
    def state(self) -> Path:
        return self.state_arg.resolve()

    def _write(self, name: str, text: str) -> None:
        tmp = self.state / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.state / name)

    def _record(self) -> None:
        pg_pid = self.pg.proc.pid if self.pg and self.pg.proc else None
        nats_pid = self.nats.proc.pid if self.nats and self.nats.proc else None
        pods = [
            {"name": p.name, "pid": p.proc.pid if p.proc else None, "port": p.port, "url": p.url}
            for p in self.pods
        ]
        body = {"supervisor": os.getpid(), "postgres": pg_pid, "nats": nats_pid, "pods": pods}
        self._write("pods.json", json.dumps(body, indent=2) + "\n")

    def _lock(self) -> None:
        """One supervisor per state directory (its PostgreSQL data, its pod names)."""
        import fcntl

        path = self.state / "dev.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DevError(
                f"threadgate dev is already running on {self.state} (pid {holder}); "
                "stop it, or give this one another --state-dir",
                2,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.lock_fd = fd

    # -- signals
    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stopping:
            self.hurry = True  # a second Ctrl-C: kill the pods now
            return
        self.stopping = True
        if self.starting:
            raise _Interrupted

    def run(self) -> int:
        """Start everything, supervise until Ctrl-C/SIGTERM, stop in order. Exit status."""
        if self.state_arg.exists():
            self._lock()  # before the port check: a running stack holds those ports
        check_ports(self.n, self.port, self.pg_port, self.nats_port)
        make_state_dir(self.state_arg)
        if self.lock_fd is None:
            self._lock()
        # SIGHUP too: a closed terminal must not leave PostgreSQL and nats-server orphaned.
        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, self._on_signal) for s in stops}
        try:
            self._start()
            self.starting = False
            if not self.stopping:
                self._supervise()
            return 0
        except _Interrupted:
            return 0
        finally:
            self.starting = False
            self.stopping = True
            try:
                self._stop()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def _start(self) -> None:
        t0 = time.monotonic()
        self.say(f"state in {self.state}")
        self.pg = Postgres(self.state / "pg", port=self.pg_port or None)
        self.nats = NatsServer(self.state / "nats", port=self.nats_port or None)
        self.pg.start()
        self.say(f"PostgreSQL on 127.0.0.1:{self.pg.port} (data in {self.pg.data_dir})")
        self.nats.start()
        self.say(f"nats-server with JetStream on 127.0.0.1:{self.nats.port}")
        env = dict(os.environ)
        env.update(THREADGATE_DATABASE_URL=self.pg.url(), THREADGATE_NATS_URL=self.nats.url)
        for i in range(self.n):
            port = self.port + i if self.port else free_port()
            self.pods.append(_Pod(f"threadgate-{i}", port, env))
        for pod in self.pods:
            pod.spawn()
        self._record()
        self.say(f"starting {self.n} pod(s) ...")
        for pod in self.pods:
            try:
                wait_for(lambda p=pod: _ready(p.url), 120, pod.name, pod.proc)
            except RuntimeError:
                assert pod.proc is not None
                raise DevError(
                    f"{pod.name} {describe_exit(pod.proc.returncode)} while starting "
                    "(its log is above)"
                ) from None
            except TimeoutError:
                raise DevError(f"{pod.name} was not ready after 120s (its log is above)") from None
        self._write("urls", "".join(f"{p.url}\n" for p in self.pods))
        self._banner(time.monotonic() - t0)

    def _banner(self, took: float) -> None:
        first = self.pods[0].url
        victim = self.pods[-1].name
        tg = _cli_name()
        lines = [
            "",
            f"threadgate is ready in {took:.1f}s",
            "",
            f"  {'pod':<14} {'url':<24} pid",
            *(f"  {p.name:<14} {p.url:<24} {p.proc.pid if p.proc else '-'}" for p in self.pods),
            "",
            f"  chat page  {first}/?thread=demo",
            f"  API docs   {first}/docs",
            f"  postgres   {self.pg.url() if self.pg else '-'}",
            f"  nats       {self.nats.url if self.nats else '-'}",
            "",
            f'  try   {tg} post demo "hello" --attach',
            f"        curl -N {first}/threads/demo/attach   (waits for the thread's first run)",
            f"        {tg} dev kill {victim}   (the pod is started again)",
            "  Ctrl-C stops everything.",
            "",
        ]
        print("\n".join(lines), flush=True)

    def _supervise(self) -> None:
        """Wait for a pod to die, a restart to be due, or a signal."""
        import selectors

        sel = selectors.DefaultSelector()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        sel.register(wake_r, selectors.EVENT_READ, None)
        watched: dict[int, _Pod] = {}

        def watch(pod: _Pod) -> None:
            if pod.pidfd is not None:
                sel.register(pod.pidfd, selectors.EVENT_READ, pod)
                watched[pod.pidfd] = pod

        for pod in self.pods:
            watch(pod)
        try:
            while not self.stopping:
                now = time.monotonic()
                due = [p.restart_at for p in self.pods if p.restart_at is not None]
                timeout = max(min(due) - now, 0) if due else None
                if any(p.announce for p in self.pods) or len(watched) < len(self.pods):
                    timeout = 0.25 if timeout is None else min(timeout, 0.25)
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
                if self.stopping:
                    break
                for pod in self.pods:
                    if pod.restart_at is None and not pod.alive:
                        if pod.pidfd is not None:
                            sel.unregister(pod.pidfd)
                            watched.pop(pod.pidfd, None)
                            os.close(pod.pidfd)
                            pod.pidfd = None
                        self._died(pod)
                    elif pod.restart_at is not None and time.monotonic() >= pod.restart_at:
                        pod.spawn()
                        pod.announce = True
                        watch(pod)
                        self._record()
                    elif pod.announce and pod.alive and _ready(pod.url, timeout=0.5):
                        pod.announce = False
                        assert pod.proc is not None
                        took = time.monotonic() - pod.started
                        self.say(f"{pod.name} is back (pid {pod.proc.pid}, ready in {took:.1f}s)")
        finally:
            signal.set_wakeup_fd(old_wakeup)
            sel.close()
            os.close(wake_r)
            os.close(wake_w)
            for pod in self.pods:
                if pod.pidfd is not None:
                    os.close(pod.pidfd)
                    pod.pidfd = None

    def _died(self, pod: _Pod) -> None:
        assert pod.proc is not None
        lived = time.monotonic() - pod.started
        pod.delay = restart_delay(pod.delay, lived)
        pod.restart_at = time.monotonic() + pod.delay
        pod.announce = False
        self.say(
            f"{pod.name} (pid {pod.proc.pid}) {describe_exit(pod.proc.returncode)} after "
            f"{lived:.0f}s; starting it again in {pod.delay:.0f}s"
        )

    def _stop(self) -> None:
        """The pods (SIGTERM: each drains its runs), then nats-server, then PostgreSQL."""
        with contextlib.suppress(FileNotFoundError):
            (self.state / "urls").unlink()  # nobody should pick this stack any more
        live = [p for p in self.pods if p.alive]
        if live:
            self.say("stopping: the pods drain their runs first (Ctrl-C again: kill them now)")
        for pod in live:
            assert pod.proc is not None
            with contextlib.suppress(ProcessLookupError):
                pod.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + POD_STOP_S
        for pod in live:
            assert pod.proc is not None
            while pod.proc.poll() is None:
                if self.hurry or time.monotonic() > deadline:
                    pod.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pod.proc.wait(0.1)  # a short wait, so that a second Ctrl-C is heard
            self.say(f"{pod.name} stopped ({describe_exit(pod.proc.returncode)})")
        if self.nats is not None and self.nats.proc is not None:
            self.nats.stop()
            self.say("nats-server stopped")
        if self.pg is not None and self.pg.proc is not None:
            self.pg.stop()
            self.say("PostgreSQL stopped")
        with contextlib.suppress(FileNotFoundError):
            (self.state / "pods.json").unlink()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        self.say("stopped")


def _cli_name() -> str:
    """How the person at this terminal runs the CLI: `threadgate` if that is on their PATH,
    else its path (`.venv/bin/threadgate` from the checkout)."""
    exe = Path(sys.executable).parent / "threadgate"
    if not exe.exists():
        return "threadgate"
    found = shutil.which("threadgate")
    if found and Path(found).resolve() == exe.resolve():
        return "threadgate"
    with contextlib.suppress(ValueError):
        return str(exe.absolute().relative_to(Path.cwd()))
    return str(exe)


def _ready(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _title(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def find_pod(state: Path, name: str) -> int:
    """The pid of the live process of pod `name`: from the supervisor's pods.json, else by
    its process title (`threadgate serve NAME`)."""
    title = POD_TITLE.format(name=name)
    known: list[str] = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        for entry in json.loads((Path(state) / "pods.json").read_text())["pods"]:
            known.append(entry["name"])
            if entry["name"] == name and entry["pid"] and _title(entry["pid"]) == title:
                return int(entry["pid"])
    found = [int(d) for d in os.listdir("/proc") if d.isdigit() and _title(int(d)) == title]
    if len(found) == 1:
        return found[0]
    if found:
        raise DevError(
            f"{len(found)} processes are titled {title!r} (pids {found}); "
            "say which stack with --state-dir"
        )
    hint = f" (pods here: {', '.join(known)})" if known else "; is `threadgate dev` running here?"
    raise DevError(f"no running pod named {name}{hint}")


def clean_state(state: Path) -> None:
    """Remove a stopped stack's state directory and the data directory it links to."""
    import fcntl

    state = Path(state)
    if not state.exists():
        return
    fd = os.open(state / "dev.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DevError(f"threadgate dev is running on {state}: stop it first", 2) from None
    finally:
        os.close(fd)
    for entry in state.iterdir():
        if entry.is_symlink() and entry.resolve().name.startswith("threadgate-pgdata-"):
            shutil.rmtree(entry.resolve(), ignore_errors=True)
    shutil.rmtree(state)
