"""Child processes of the embedded stack: free ports, readiness waits, who a pid is now."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

# Ports handed out by free_port, each held by a bound socket that never listens. A port read
# from a closed socket is free for anyone until our server binds it (seconds later, after a
# Python start-up), and free again whenever that server restarts on it: another process's
# bind(0) could take it meanwhile. While held here, the kernel gives it to no other bind(0)
# and a plain bind of it fails, yet our servers bind and listen on it, since uvicorn (asyncio),
# PostgreSQL and nats-server (Go) set SO_REUSEADDR, which Linux grants beside a socket that
# does not listen; and a connection to it while none of them listens is still refused.
_held: dict[int, socket.socket] = {}


def free_port() -> int:
    """A loopback port kept for this process's servers until `release_port` (or exit)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    _held[port] = s
    return port


def release_port(port: int) -> None:
    """Give back a port from free_port, once no server of ours will bind it again."""
    s = _held.pop(port, None)
    if s is not None:
        s.close()


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


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22), or None
    when no such process runs. A pid and its start time name one process: a pid alone may
    have been given to another since it was recorded."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")": split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie is gone for our purposes (its parent has not reaped it yet)
    return int(fields[19])


def is_running(pid: int, started: int | None) -> bool:
    """Whether the process recorded as (`pid`, `started`) is still that one, alive."""
    return started is not None and start_time(pid) == started
