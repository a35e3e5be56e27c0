"""A pod of `threadgate dev`: one name and port, like a StatefulSet member, its current
process (with the start time that names it beside its pid), and when it starts again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from .processes import start_time

RESTART_FIRST_S = 1.0  # a dead pod is started again after 1 s, doubling on a crash loop,
RESTART_CAP_S = 30.0  # up to 30 s,
HEALTHY_S = 60.0  # back to 1 s once a process has lived a minute.
POD_TITLE = "threadgate serve {name}"  # the pods' process title, for `ps`


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


def _die_with_parent() -> None:
    """In a pod's process, before exec: SIGTERM when the supervisor dies (even SIGKILLed)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


class Pod:
    """One pod name and port, like a StatefulSet member; `proc` is its current process."""

    def __init__(self, name: str, port: int, env: dict[str, str]) -> None:
        self.name, self.port, self.env = name, port, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # time.monotonic() of the current process's start
        self.start_ticks: int | None = None  # its /proc start time: pid + this name it
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
        self.start_ticks = start_time(self.proc.pid)
        self.restart_at = None
        self.pidfd = None
        with contextlib.suppress(AttributeError, OSError):
            self.pidfd = os.pidfd_open(self.proc.pid)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def ready(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
