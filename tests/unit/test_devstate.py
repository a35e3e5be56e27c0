"""`threadgate dev kill` acts on the process its stack recorded and on nothing else (real
processes, no stack: a record written here names them); `dev clean` says what it removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from threadgate import cli, devstate
from threadgate.processes import start_time

pytestmark = pytest.mark.unit

# A process titled as a pod is (`ps` shows `threadgate serve threadgate-0`), doing nothing.
DECOY = "import setproctitle, time; setproctitle.setproctitle({title!r}); time.sleep(600)"


@pytest.fixture
def decoy() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", DECOY.format(title="threadgate serve threadgate-0")]
    )
    yield proc
    proc.kill()
    proc.wait()


def write_record(state: Path, pods: list[dict[str, object]]) -> None:
    """A record as a running supervisor writes it; the supervisor is this test's process."""
    state.mkdir(parents=True, exist_ok=True)
    me = os.getpid()
    body = devstate.record((me, start_time(me)), pods, postgres=None, nats=None)
    (state / devstate.RECORD).write_text(json.dumps(body))


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_a_pid_given_to_another_process_is_not_signalled(
    tmp_path: Path, decoy: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    """The record names pid P, but P's start time is not the recorded one: the pod died and
    P went to some other process (here: the decoy). Nothing is signalled."""
    state = tmp_path / ".threadgate"
    started = start_time(decoy.pid)
    assert started is not None
    pod = {"name": "threadgate-0", "pid": decoy.pid, "started": started - 1, "port": 1, "url": ""}
    write_record(state, [pod])
    code, out, err = run(["dev", "kill", "threadgate-0", "--state-dir", str(state)], capsys)
    assert code == cli.USAGE and out == ""
    assert err == (
        f"threadgate: dev: threadgate-0 is not running: its recorded process (pid {decoy.pid})"
        " has exited; the supervisor starts it again\n"
    )
    assert decoy.poll() is None  # alive
    assert not (state / devstate.KILLS).exists()  # no note for the supervisor either


def test_the_recorded_process_is_signalled_and_the_supervisor_told(
    tmp_path: Path, decoy: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / ".threadgate"
    started = start_time(decoy.pid)
    pod = {"name": "threadgate-0", "pid": decoy.pid, "started": started, "port": 1, "url": ""}
    write_record(state, [pod])
    # Found from a directory below the stack's, as the README's commands are typed.
    (tmp_path / "sub").mkdir()
    assert devstate.find_state(None, tmp_path / "sub") == state
    code, out, err = run(["dev", "kill", "threadgate-0", "--state-dir", str(state)], capsys)
    assert code == cli.OK, err
    assert out.startswith(f"sent SIGKILL to threadgate-0 (pid {decoy.pid}) of the stack in")
    assert decoy.wait(10) == -signal.SIGKILL
    assert devstate.kill_was_asked(state, "threadgate-0", decoy.pid, started)
    assert not devstate.kill_was_asked(state, "threadgate-0", decoy.pid, started)  # used up


def test_no_process_outside_the_record_is_looked_at(
    tmp_path: Path, decoy: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    """A stack without that pod, a stack whose supervisor is gone, no stack at all: the
    decoy titled `threadgate serve threadgate-0` lives through all of them."""
    state = tmp_path / ".threadgate"
    write_record(state, [])
    code, _, err = run(["dev", "kill", "threadgate-0", "--state-dir", str(state)], capsys)
    assert code == cli.USAGE and "no pod named threadgate-0" in err
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    body = json.loads((state / devstate.RECORD).read_text())
    body["supervisor"], body["supervisor_started"] = gone.pid, 1
    (state / devstate.RECORD).write_text(json.dumps(body))
    code, _, err = run(["dev", "kill", "threadgate-0", "--state-dir", str(state)], capsys)
    assert code == cli.USAGE and "is not running (its supervisor" in err
    code, _, err = run(["dev", "kill", "threadgate-0", "--state-dir", str(tmp_path)], capsys)
    assert code == cli.USAGE and "no threadgate dev is running" in err
    assert decoy.poll() is None


def test_clean_says_what_it_removed_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    (state / "pg").mkdir(parents=True)
    (state / "nats").mkdir()
    (state / "dev.lock").write_text("1\n")
    (state / "pg.log").write_text("")
    code, out, _ = run(["dev", "clean", "--state-dir", str(state)], capsys)
    assert code == cli.OK
    assert out.splitlines() == [f"removed {state} (PostgreSQL's data with it)"]
    assert not state.exists()
    code, out, _ = run(["dev", "clean", "--state-dir", str(state)], capsys)
    assert code == cli.OK and out == f"nothing to remove: {state} does not exist\n"


def test_clean_refuses_a_directory_that_is_not_a_stacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    code, out, err = run(["dev", "clean", "--state-dir", str(tmp_path)], capsys)
    assert code == cli.USAGE and out == ""
    assert "holds files threadgate dev did not make (notes.txt)" in err
    assert (tmp_path / "notes.txt").exists()
