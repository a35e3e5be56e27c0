"""Real `threadgate serve` processes on one stack: start, SIGKILL, SIGTERM, restart by name.

Free of pytest so that `bench/` can drive pods the same way the multipod tests do. A pod is a
name and a port, like a StatefulSet member: it may be restarted under both, and at most one
live process holds a name at a time (a second one is only started on purpose, as a rogue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from threadgate.client import AsyncClient, Reply, SseEvent
from threadgate.devstack import free_port, release_port

REPO = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "threadgate.cli", "serve"]
TERMINAL = ("success", "error", "cancelled", "interrupted")
FAULT_EXIT = 137  # what app.workflows.thread_run._fault exits with


def pod_env(
    *, database_url: str, nats_url: str, stream: str, prefix: str, **knobs: str | float | int
) -> dict[str, str]:
    """The environment every pod of one cluster shares (THREADGATE_* of the caller dropped)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_") and k != "POD_NAME"
    }
    env.update(
        PYTHONUNBUFFERED="1",
        THREADGATE_HOST="127.0.0.1",
        THREADGATE_DATABASE_URL=database_url,
        THREADGATE_NATS_URL=nats_url,
        THREADGATE_STREAM_NAME=stream,
        THREADGATE_SUBJECT_PREFIX=prefix,
        THREADGATE_MOCK_DELAY_MS="5",
        THREADGATE_KEEPALIVE_S="1",
        THREADGATE_CLAIM_TIMEOUT_S="3",
        THREADGATE_DRAIN_TIMEOUT_S="15",
        THREADGATE_LOG_FORMAT="json",
        # One part per mock chunk, as the suite's expected replies count them (coalescing
        # merges chunks under load: tests/multipod/test_coalescing.py turns it back on).
        THREADGATE_COALESCE_MS="0",
        # The session's nats-server holds the streams of a test's clusters and JetStream
        # reserves each one's max_bytes up front (1 GiB by default): they must fit a CI disk.
        THREADGATE_STREAM_MAX_BYTES=str(256 * 1024**2),
    )
    env.update({f"THREADGATE_{k.upper()}": str(v) for k, v in knobs.items()})
    return env


@dataclass
class Pod:
    """One pod name and port; `proc` is its current process (or the last one, once dead)."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    spawned_at: float = 0.0  # time.monotonic() of the current process's start
    spawned_wall: float = 0.0  # the same moment by the wall clock (log lines carry that)
    starts: int = 0
    own: dict[str, str] = field(default_factory=dict)  # this member's settings (every start)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def spawn(self, env_overrides: Mapping[str, str] | None = None) -> None:
        """Start a process under this name; the previous one must be dead (StatefulSet rule).
        The member's own settings apply to every start; `env_overrides` to this one."""
        assert not self.alive, f"{self.name} still runs as pid {self.pid}: one process per name"
        env = {
            **self.env,
            **self.own,
            **(env_overrides or {}),
            "POD_NAME": self.name,
            "THREADGATE_PORT": str(self.port),
        }
        self.starts += 1
        with open(self.log_path, "ab") as log:
            shown = {**self.own, **(env_overrides or {})}
            extra = f" overrides={shown}" if shown else ""
            log.write(f"=== {self.name} start #{self.starts} port={self.port}{extra}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                SERVE,
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.spawned_at, self.spawned_wall = time.monotonic(), time.time()

    async def wait_ready(self, timeout: float = 60.0) -> float:
        """Poll /readyz with backoff until 200; fail at once if the process exits. Seconds taken."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.02
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                if not self.alive:
                    raise RuntimeError(
                        f"{self.name} exited with {self.returncode} before it was ready\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{self.url}/readyz")).status_code == 200:
                        return time.monotonic() - self.spawned_at
                if loop.time() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready after {timeout:.0f}s\n{self.log_tail()}"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.25)

    async def restart(
        self,
        env_overrides: Mapping[str, str] | None = None,
        *,
        ready: bool = True,
        timeout: float = 60.0,
    ) -> None:
        """Same name, same port, a new process: only once the previous one is gone."""
        self.spawn(env_overrides)
        if ready:
            await self.wait_ready(timeout)

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def kill(self) -> int:
        """SIGKILL, like a node loss or the OOM killer; returns once the process is gone."""
        assert self.proc is not None
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        return await self.wait_exit(10)

    def pause(self) -> None:
        """SIGSTOP: alive (its connections and claim stay) but silent, like a frozen node."""
        assert self.proc is not None and self.alive
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def send_term(self) -> None:
        assert self.alive, f"{self.name} is not running"
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def term(self, timeout: float = 60.0) -> int:
        """SIGTERM, as Kubernetes does before deleting a pod; the exit code."""
        self.send_term()
        return await self.wait_exit(timeout)

    def log_text(self, start: int | None = None) -> str:
        """Everything the pod's processes logged, or only what its `start`-th process did."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if start is None:
            return text
        parts = text.split(f"=== {self.name} start #")
        return next((p for p in parts[1:] if p.startswith(f"{start} ")), "")

    def log_records(self, start: int | None = None) -> list[dict[str, Any]]:
        """The JSON log lines of the pod's processes (or of its `start`-th); others skipped."""
        records = []
        for line in self.log_text(start).splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


class Cluster:
    """N pods `threadgate-i` of one app over a database and a stream of their own."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        size: int = 3,
        per_pod: Mapping[int, Mapping[str, str]] | None = None,
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.per_pod = dict(per_pod or {})
        self.pods = [self._pod(f"threadgate-{i}") for i in range(size)]
        self.extra: list[Pod] = []  # processes started besides the members (rogues)

    def _pod(self, name: str) -> Pod:
        n = sum(1 for p in self.log_dir.glob(f"{name}*.log"))
        return Pod(name, free_port(), dict(self.env), self.log_dir / f"{name}.{n}.log")

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.pods]

    @property
    def all_pods(self) -> list[Pod]:
        return self.pods + self.extra

    async def start(self) -> None:
        """Every member at once (their start-up is mostly imports and DBOS launch)."""
        for i, pod in enumerate(self.pods):
            pod.own = dict(self.per_pod.get(i, {}))
            pod.spawn()
        await asyncio.gather(*(p.wait_ready() for p in self.pods))

    def rogue(self, name: str) -> Pod:
        """A process to be started under a name that may already be alive (fencing tests)."""
        pod = self._pod(name)
        self.extra.append(pod)
        return pod

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def others(self, name: str) -> list[Pod]:
        return [p for p in self.pods if p.name != name]

    def client(self, pods: Sequence[Pod] | None = None) -> AsyncClient:
        return AsyncClient([p.url for p in (pods or self.pods)])

    async def stop(self) -> None:
        """Kill every process; the pods' ports go back to the kernel (no restart after this)."""
        await asyncio.gather(*(p.kill() for p in self.all_pods if p.alive))
        for p in self.all_pods:
            release_port(p.port)

    @contextlib.asynccontextmanager
    async def supervised(self, backoff_s: float = 0.2) -> AsyncIterator[Supervisor]:
        """Restart any member that dies, under its name, as a StatefulSet does."""
        sup = Supervisor(self, backoff_s)
        task = asyncio.create_task(sup.run())
        try:
            yield sup
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def logs(self, lines: int = 40) -> str:
        parts = []
        for pod in self.all_pods:
            state = "alive" if pod.alive else f"exited {pod.returncode}"
            parts.append(
                f"===== {pod.name} ({pod.url}, pid {pod.pid}, {state}) "
                f"{pod.log_path} =====\n{pod.log_tail(lines)}"
            )
        return "\n".join(parts)


@dataclass
class Supervisor:
    """Watches a cluster's members; each one that exits is started again (its exit codes
    are kept). `hold(pod)` keeps one down, as a deleted pod or a scale-down would."""

    cluster: Cluster
    backoff_s: float
    exits: list[tuple[str, int]] = field(default_factory=list)
    held: set[str] = field(default_factory=set)

    async def run(self) -> None:
        while True:
            for pod in self.cluster.pods:
                if pod.name in self.held or pod.proc is None or pod.alive:
                    continue
                self.exits.append((pod.name, pod.returncode or 0))
                await asyncio.sleep(self.backoff_s)  # a kubelet's restart delay
                pod.spawn()
            await asyncio.sleep(0.05)  # paces polling the children's exit status


def at(timestamp: str) -> datetime:
    """A timestamp of the API (`created_at`, ...) or of a JSON log line (`ts`)."""
    return datetime.fromisoformat(timestamp)


def unique_names() -> tuple[str, str]:
    """A stream name and subject prefix no other cluster uses."""
    tag = uuid.uuid4().hex[:10]
    return f"MP_{tag}", f"mp{tag}"


async def wait_run(
    client: AsyncClient,
    thread: str,
    run_id: str,
    until: Callable[[dict[str, Any]], bool] = lambda r: r["status"] in TERMINAL,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Poll a run's status (any pod the client knows) until `until` holds or the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.02
    run: dict[str, Any] = {}
    while True:
        for url in client.urls:
            try:
                resp = await client.http.get(f"{url}/threads/{thread}/runs/{run_id}")
            except httpx.TransportError:
                continue  # that pod is down: ask the next
            run = resp.json()
            break
        if run and until(run):
            return run
        if loop.time() > deadline:
            raise TimeoutError(f"run {run_id} not there after {timeout:.0f}s: {run}")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.25)


async def stored_messages(cluster: Cluster, thread: str) -> list[tuple[datetime, dict[str, Any]]]:
    """Every message JetStream holds on the thread's subject, with the time it was stored:
    read by a consumer of our own, as many as the stream's own count for the subject says."""
    import nats
    from nats.js.api import DeliverPolicy

    env = cluster.env
    stream = env["THREADGATE_STREAM_NAME"]
    subject = f"{env['THREADGATE_SUBJECT_PREFIX']}.thread.{thread}"
    nc = await nats.connect(env["THREADGATE_NATS_URL"].split(","))
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream, subjects_filter=subject)
        count = (info.state.subjects or {}).get(subject, 0)
        sub = await js.subscribe(
            subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        try:
            out = []
            for _ in range(count):
                msg = await sub.next_msg(timeout=10)
                out.append((msg.metadata.timestamp, json.loads(msg.data)))
            return out
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


async def metric(pod: Pod, name: str) -> float:
    """A counter or gauge of the pod's /metrics (summed over its labels)."""
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{pod.url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((f"{name} ", f"{name}{{"))
    )


async def wait_metric(pod: Pod, name: str, at_least: float, timeout: float = 30.0) -> float:
    """Poll the pod's /metrics until `name` reaches `at_least`; its value then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (value := await metric(pod, name)) < at_least:
        assert loop.time() < deadline, f"{pod.name}: {name} = {value}, never {at_least}"
        await asyncio.sleep(0.05)  # paces polling another process's metrics
    return value


async def running_on(
    client: AsyncClient, cluster: Cluster, thread: str, run_id: str, timeout: float = 30.0
) -> Pod:
    """The pod executing a run, once it has begun an attempt."""
    run = await wait_run(client, thread, run_id, lambda r: r["status"] == "running", timeout)
    return cluster.pod(run["executor"])


@dataclass
class Attacher:
    """A client attached to a thread in the background, keeping every raw event it gets.

    `urls[0]` is attached first; with `reconnects` > 0 a broken connection resumes with
    Last-Event-ID on the next URL (threadgate.client.AsyncClient.events).
    """

    urls: list[str]
    thread: str
    reconnects: int = 0
    events: list[SseEvent] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.monotonic() of each event
    reply: Reply = field(default_factory=Reply)
    task: asyncio.Task[Reply] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> Attacher:
        self.task = asyncio.create_task(self._run())
        # Its failure is raised by wait_for/result; one nobody waited for is not worth a warning.
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self

    async def _run(self) -> Reply:
        try:
            async with AsyncClient(self.urls) as client:
                async for ev in client.events(self.thread, reconnects=self.reconnects):
                    self.events.append(ev)
                    self.arrived.append(time.monotonic())
                    self.reply.apply(ev)
                    self._changed.set()
            return self.reply
        finally:
            self._changed.set()

    async def wait_for(self, pred: Callable[[SseEvent], bool], timeout: float = 30.0) -> SseEvent:
        """The first event (seen so far or to come) that satisfies `pred`."""
        assert self.task is not None
        async with asyncio.timeout(timeout):
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                if self.task.done():
                    self.task.result()  # raises what ended it
                    raise AssertionError(f"attach ended without such an event: {self.events}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_chunk(self, index: int, timeout: float = 30.0) -> SseEvent:
        return await self.wait_for(
            lambda e: e.event == "chunk" and e.data["index"] >= index, timeout
        )

    async def result(self, timeout: float = 60.0) -> Reply:
        assert self.task is not None
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    async def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def final_attempt(events: list[SseEvent]) -> list[SseEvent]:
    """The events from the last `run_started` on: what a client shows once resets are applied."""
    starts = [i for i, ev in enumerate(events) if ev.event == "run_started"]
    return events[starts[-1] :] if starts else []
