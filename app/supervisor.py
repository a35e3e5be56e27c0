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

from . import devstate
from .devpod import POD_TITLE, RESTART_FIRST_S, Pod, describe_exit, ready, restart_delay
from .devstack import NatsServer, Postgres, free_port, make_state_dir, wait_for
from .devstate import DevError
from .processes import start_time

__all__ = ["POD_TITLE", "DevError", "DevStack", "check_ports", "describe_exit", "restart_delay"]

POD_STOP_S = 60.0  # a pod's drain on SIGTERM is 25 s by default: SIGKILL after this.


class _Interrupted(BaseException):
    """Ctrl-C or SIGTERM while the stack was starting."""


def _port_free(port: int) -> bool:
    """Free on every address (whatever --host): a port in use anywhere is refused."""
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


class DevStack:
    """`threadgate dev`: PostgreSQL, nats-server and N pods; a pod that dies is started again
    under its name and port (1 s doubling to 30 s on a crash loop, reset after a healthy
    minute); Ctrl-C or SIGTERM stops the pods (SIGTERM: they drain), then nats-server, then
    PostgreSQL. Writes `urls` (once every pod is ready) and `pods.json` in the state dir."""

    def __init__(
        self,
        state: Path,
        *,
        pods: int,
        port: int,
        pg_port: int = 0,
        nats_port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.state_arg = Path(state)
        self.n, self.port, self.pg_port, self.nats_port = pods, port, pg_port, nats_port
        self.host = host  # the pods' address; PostgreSQL and nats-server: 127.0.0.1 always
        self.pods: list[Pod] = []
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
        devstate.write(self.state, name, text)

    def _record(self) -> None:
        """pods.json: what `dev kill` and `dev demo` act on (pids with start times)."""
        pods = [
            {
                "name": p.name,
                "pid": p.proc.pid if p.proc else None,
                "started": p.start_ticks,
                "port": p.port,
                "url": p.url,
            }
            for p in self.pods
        ]
        body = devstate.record(
            (os.getpid(), start_time(os.getpid())),
            pods,
            postgres=self.pg.proc.pid if self.pg and self.pg.proc else None,
            nats=self.nats.proc.pid if self.nats and self.nats.proc else None,
        )
        self._write(devstate.RECORD, json.dumps(body, indent=2) + "\n")

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
        if self.state_arg.exists():
            # Notes of a `dev kill` that a previous stack never read: not for these pods.
            shutil.rmtree(self.state_arg / devstate.KILLS, ignore_errors=True)
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
        env.update(
            THREADGATE_DATABASE_URL=self.pg.url(),
            THREADGATE_NATS_URL=self.nats.url,
            THREADGATE_HOST=self.host,  # not the pod default 0.0.0.0: auth is off in dev
        )
        for i in range(self.n):
            port = self.port + i if self.port else free_port()
            self.pods.append(Pod(f"threadgate-{i}", port, env))
        for pod in self.pods:
            pod.spawn()
        self._record()
        self.say(f"starting {self.n} pod(s) ...")
        for pod in self.pods:
            try:
                wait_for(lambda p=pod: ready(p.url), 120, pod.name, pod.proc)
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
            f"        {tg} dev demo   (a pod dies mid-reply; the reply continues)",
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
        watched: dict[int, Pod] = {}

        def watch(pod: Pod) -> None:
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
                    elif pod.announce and pod.alive and ready(pod.url, timeout=0.5):
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

    def _died(self, pod: Pod) -> None:
        assert pod.proc is not None
        lived = time.monotonic() - pod.started
        asked = devstate.kill_was_asked(self.state, pod.name, pod.proc.pid, pod.start_ticks)
        # A death someone asked for is no crash loop: no backoff (the demo, tried again).
        pod.delay = RESTART_FIRST_S if asked else restart_delay(pod.delay, lived)
        pod.restart_at = time.monotonic() + pod.delay
        pod.announce = False
        how = describe_exit(pod.proc.returncode) + (" (threadgate dev kill)" if asked else "")
        self.say(
            f"{pod.name} (pid {pod.proc.pid}) {how} after {lived:.0f}s; "
            f"starting it again in {pod.delay:.0f}s"
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
        devstate.remove(self.state, devstate.RECORD)
        shutil.rmtree(self.state / devstate.KILLS, ignore_errors=True)
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
