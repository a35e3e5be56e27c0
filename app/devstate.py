"""A dev stack's state directory: its record of processes, found from where you stand;
`threadgate dev kill` (only this stack's pods) and `threadgate dev clean`.

The supervisor (app/supervisor.py) writes `pods.json`: every process it started, by pid AND
start time (/proc/<pid>/stat), since a pid alone may belong to another process by the time
someone reads it. Nothing here looks at any process the record does not name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .processes import is_running, start_time

STATE_DIR = ".threadgate"  # `threadgate dev`'s default --state-dir
RECORD = "pods.json"
KILLS = "kills"  # a `dev kill` leaves a note here for the supervisor: no crash-loop backoff
# Files and directories a stack makes in its state directory: `dev clean` removes only these.
OWN = ("pg", "pg.log", "nats", "nats.log", "nats.conf", RECORD, "urls", "dev.lock", KILLS)


class DevError(Exception):
    """Why `threadgate dev` cannot go on, in one line, with its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Recorded:
    """A process the supervisor started, as pods.json names it."""

    name: str
    pid: int
    started: int | None  # /proc/<pid>/stat start time when it was recorded
    port: int = 0
    url: str = ""

    @property
    def running(self) -> bool:
        """Still that very process (not a later one that got its pid)."""
        return is_running(self.pid, self.started)


def find_state(given: str | None, start: Path | None = None) -> Path:
    """The state directory: `given` (--state-dir), else the nearest `.threadgate` holding a
    stack's record, in the current directory or above it."""
    if given is not None:
        return Path(given)
    here = (start or Path.cwd()).absolute()
    for directory in (here, *here.parents):
        candidate = directory / STATE_DIR
        if (candidate / RECORD).is_file() or (candidate / "dev.lock").is_file():
            return candidate
    return here / STATE_DIR


def record(
    supervisor: tuple[int, int | None],
    pods: list[dict[str, Any]],
    **servers: int | None,
) -> dict[str, Any]:
    """pods.json's content: each pod's pid and start time, the servers' pids."""
    return {
        "supervisor": supervisor[0],
        "supervisor_started": supervisor[1],
        **servers,
        "pods": pods,
    }


def read(state: Path) -> dict[str, Any]:
    """The running stack's record; DevError (exit 2) when no stack runs on `state`."""
    path = Path(state) / RECORD
    try:
        body = json.loads(path.read_text())
        supervisor = Recorded("supervisor", int(body["supervisor"]), body["supervisor_started"])
    except FileNotFoundError:
        raise DevError(f"no threadgate dev is running on {state} (no {RECORD} there)", 2) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise DevError(
            f"{path} cannot be read: is it a threadgate dev state directory?", 2
        ) from None
    if not supervisor.running:
        raise DevError(
            f"the threadgate dev of {state} is not running (its supervisor, pid "
            f"{supervisor.pid}, has exited)",
            2,
        )
    return dict(body)


def pods(state: Path) -> list[Recorded]:
    """The running stack's pods, in order (threadgate-0 first)."""
    return [
        Recorded(p["name"], int(p["pid"]), p.get("started"), int(p["port"]), str(p["url"]))
        for p in read(state)["pods"]
        if p.get("pid")
    ]


def pod(state: Path, name: str) -> Recorded:
    known = pods(state)
    for p in known:
        if p.name == name:
            return p
    names = ", ".join(p.name for p in known) or "none"
    raise DevError(f"no pod named {name} in the stack of {state} (its pods: {names})", 2)


def kill(state: Path, name: str, sig: signal.Signals) -> Recorded:
    """Signal the process the supervisor recorded for pod `name`, if it is still that very
    process; leave the supervisor a note so that it restarts the pod without backoff."""
    target = pod(state, name)
    try:
        # A pidfd names one process for good: the start time is checked on what it names, and
        # the signal goes to that process, never to a later owner of the pid.
        fd = os.pidfd_open(target.pid)
    except ProcessLookupError:
        fd = None
    try:
        if fd is None or start_time(target.pid) != target.started:
            raise DevError(
                f"{name} is not running: its recorded process (pid {target.pid}) has exited; "
                "the supervisor starts it again",
                2,
            )
        _note_kill(Path(state), target)
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        raise DevError(
            f"{name} (pid {target.pid}) exited before it could be signalled", 2
        ) from None
    finally:
        if fd is not None:
            os.close(fd)
    return target


def _note_kill(state: Path, target: Recorded) -> None:
    notes = state / KILLS
    notes.mkdir(exist_ok=True)
    tmp = notes / f".{target.name}.tmp"
    tmp.write_text(f"{target.pid} {target.started}\n")
    tmp.replace(notes / target.name)


def kill_was_asked(state: Path, name: str, pid: int, started: int | None) -> bool:
    """Whether `dev kill` asked for the death of this process (the note is used up)."""
    note = Path(state) / KILLS / name
    try:
        text = note.read_text().split()
        note.unlink()
    except OSError:
        return False
    return text == [str(pid), str(started)]


def clean(state: Path) -> list[str]:
    """Remove a stopped stack's state directory and the data directory it links to; what was
    removed, one item a line. Refuses a directory that is not a stack's."""
    import fcntl

    state = Path(state)
    if not state.exists():
        return []
    entries = {e.name for e in state.iterdir()}
    if not entries <= set(OWN) | {f".{n}.tmp" for n in OWN}:
        strange = ", ".join(sorted(entries - set(OWN))[:5])
        raise DevError(
            f"{state} holds files threadgate dev did not make ({strange}): not removing it", 2
        )
    fd = os.open(state / "dev.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DevError(f"threadgate dev is running on {state}: stop it first", 2) from None
    finally:
        os.close(fd)
    removed: list[str] = []
    pg = state / "pg"
    inside = ""
    if pg.is_symlink():
        target = pg.resolve()
        if target.name.startswith("threadgate-pgdata-") and target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            removed.append(f"{target} (PostgreSQL's data)")
    elif pg.is_dir():
        inside = " (PostgreSQL's data with it)"
    shutil.rmtree(state)
    removed.insert(0, f"{state.absolute()}{inside}")
    return removed


def write(state: Path, name: str, text: str) -> None:
    """A file of the state directory, replaced at once (readers never see half of it)."""
    tmp = Path(state) / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(Path(state) / name)


def remove(state: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(state) / name).unlink()
