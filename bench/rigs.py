"""Servers under measurement, side by side: a rig per server (a threadgate pod of this tree or
of a git revision, a peer), its clients' turns in bursts, and what each costs.

A rig knows its server process (CPU of the whole process tree: a pod of several processes
counts them all), its database (committed transactions, PgCounters), its broker (nats-server,
or a peer's Redis) and PostgreSQL (shared by every rig of a run). `compare` runs each phase on
every rig before the next phase, so that a shared machine's moods fall on all of them alike.
Used by ttfc, round3, idle, profile, ttfc_paths and the LangGraph peer.
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import psycopg

from bench.harness import (
    SERVE,
    PgCounters,
    Proc,
    Stack,
    database_name,
    loadavg,
    ms,
    pct,
    pod,
    pod_env,
    proc_cpu_s,
    proc_tree_cpu_s,
    say,
)
from bench.sse import HttpConn, Stream, attach

# Killed 12.5 s into a 20 s run: past LangGraph dev's 10 s persistence flush, so its run is on disk.
KILL_CHUNKS, KILL_DELAY_MS, KILL_AFTER = 400, 50, 250


@dataclass
class Turn:
    ttfc: float
    stream: Stream


class System:
    name = ""
    proc: Proc

    async def start(self) -> None: ...
    async def stop(self) -> None:
        await self.proc.stop()

    async def conversation(self) -> str:
        return uuid.uuid4().hex[:12]

    async def turn(self, conv: str, chunks: int, delay_ms: float) -> Turn:
        raise NotImplementedError

    async def kill_test(self) -> str:
        raise NotImplementedError

    def chunk_count(self, s: Stream) -> int:
        return sum(1 for _, ev, _ in s.events if ev == "chunk")


CHUNKS = 5  # a short reply: the first chunk is what is timed
THINK_S = 0.1  # a random pause of up to this before each burst (not timed)
LEVELS = (1, 10, 100)


@dataclass
class Sample:
    thread: str
    run_id: str
    wall0: float  # time.time() when the POST was written
    ttfc: float  # seconds, POST written → first chunk read
    post: float  # seconds, POST written → 202 read
    cold: bool


@dataclass
class Phase:
    level: int
    samples: list[Sample] = field(default_factory=list)
    cold: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    cpu_s: float = 0.0
    breakdown: dict[str, float] = field(default_factory=dict)
    broker_cpu_s: float = float("nan")  # nats-server / Redis over the phase
    pg_cpu_s: float = float("nan")  # PostgreSQL (every backend) over the phase
    load: str = ""  # the machine's 1-minute load average as the phase began

    @property
    def runs(self) -> int:
        return len(self.samples) + len(self.cold)


class Turns(Protocol):
    async def prepare(self) -> None: ...
    async def turn(
        self, chunks: int = CHUNKS, cold: bool = False, delay_ms: float = 0
    ) -> Sample: ...
    def close(self) -> None: ...


class Poster:
    """One conversation: a keep-alive connection for its POSTs, a fresh stream per run."""

    def __init__(self, port: int, thread: str) -> None:
        self.port = port
        self.thread = thread
        self.conn: HttpConn | None = None

    async def prepare(self) -> None:
        pass

    async def turn(self, chunks: int = CHUNKS, cold: bool = False, delay_ms: float = 0) -> Sample:
        if self.conn is None or self.conn.lost.done():
            self.conn = await HttpConn.open(self.port)
        body = {"input": "hello", "model_options": {"chunks": chunks, "delay_ms": delay_ms}}
        wall0, t0 = time.time(), time.perf_counter()
        resp = await self.conn.request("POST", f"/threads/{self.thread}/runs", body)
        t_post = time.perf_counter()
        if resp.status != 202:
            raise RuntimeError(f"POST {resp.status}: {resp.body[:300]!r}")
        run_id = resp.json()["run_id"]
        stream, sconn = await attach(self.port, f"/threads/{self.thread}/attach", keep=False)
        try:
            assert stream.finished is not None
            # A streaming phase queues runs behind others (LangGraph runs 10 at a time).
            await asyncio.wait_for(stream.finished, 60 + 10 * chunks * delay_ms / 1000)
        finally:
            sconn.close()
        if stream.status != 200 or stream.first_chunk is None:
            raise RuntimeError(f"attach {stream.status}, no chunk for run {run_id}")
        return Sample(self.thread, run_id, wall0, stream.first_chunk - t0, t_post - t0, cold)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


async def run_phase(
    p: Proc,
    level: int,
    rounds: int,
    tag: str,
    make: Callable[[int, str], Turns] | None = None,
    think_s: float = THINK_S,
    side: Callable[[], tuple[float, float]] | None = None,
) -> Phase:
    """`rounds` bursts of `level` simultaneous POSTs; the first burst (cold) is kept apart.

    `make(port, thread)`: the client of one conversation (threadgate's Poster by default);
    `side()`: CPU seconds of the server's broker and of PostgreSQL so far."""
    tag = re.sub(r"[^A-Za-z0-9_-]", "", tag)
    make = make or Poster
    posters = [make(p.port, f"{tag}-{level}-{i}-{uuid.uuid4().hex[:6]}") for i in range(level)]
    phase = Phase(level, load=loadavg().split()[0])
    for x in posters:
        await x.prepare()
    cpu0, t0 = p.cpu_s(), time.monotonic()
    b0, g0 = side() if side else (float("nan"),) * 2
    try:
        for r in range(rounds + 1):
            # A think time between turns, untimed: back-to-back turns last about one polling
            # interval and would lock onto the queue worker's phase (a steady, unfair wait).
            if think_s:
                await asyncio.sleep(random.uniform(0.0, think_s))
            got = await asyncio.gather(*(x.turn(cold=r == 0) for x in posters))
            (phase.cold if r == 0 else phase.samples).extend(got)
    finally:
        for x in posters:
            x.close()
    phase.seconds = time.monotonic() - t0
    phase.cpu_s = p.cpu_s() - cpu0
    if side:
        b1, g1 = side()
        phase.broker_cpu_s, phase.pg_cpu_s = b1 - b0, g1 - g0
    return phase


BREAKDOWN_SQL = """
SELECT r.run_id,
       extract(epoch FROM r.created_at)::float8 AS inserted,
       w.created_at / 1000.0::float8 AS enqueued,
       w.started_at_epoch_ms / 1000.0::float8 AS dequeued,
       extract(epoch FROM r.started_at)::float8 AS step
FROM threadgate.runs r JOIN dbos.workflow_status w ON w.workflow_uuid = r.run_id
WHERE r.run_id = ANY(%s)
"""


def breakdown(database_url: str, samples: list[Sample]) -> dict[str, float]:
    """Median seconds of each leg, from the rows (all clocks are this host's wall clock)."""
    with psycopg.connect(database_url) as conn:
        rows = {r[0]: r[1:] for r in conn.execute(BREAKDOWN_SQL, ([s.run_id for s in samples],))}
    legs: dict[str, list[float]] = {k: [] for k in ("post→row", "row→enq", "enq→deq", "deq→step")}
    legs["step→chunk@client"] = []
    for s in samples:
        inserted, enqueued, dequeued, step = rows[s.run_id]
        if dequeued is None:  # started without the queue (the direct path)
            dequeued = enqueued
        legs["post→row"].append(inserted - s.wall0)
        legs["row→enq"].append(enqueued - inserted)
        legs["enq→deq"].append(dequeued - enqueued)
        legs["deq→step"].append(step - dequeued)
        legs["step→chunk@client"].append(s.wall0 + s.ttfc - step)
    return {k: statistics.median(v) for k, v in legs.items()}


@dataclass
class VariantResult:
    label: str
    phases: dict[int, Phase]
    idle_xact_s: float
    idle_cpu: float
    load_xact_s: float
    load_xact_per_run: float
    load_writes_per_run: float
    system: str = "threadgate"
    sequential: Phase | None = None  # runs one after another, no pause: CPU per run
    idle_broker_cpu: float = float("nan")  # its broker's rate while every server idled
    idle_pg_cpu: float = float("nan")  # PostgreSQL's (shared by all) while every server idled
    idle_load: str = ""  # the 1-minute load average as the idle window began and ended
    seq_xact_per_run: float = float("nan")  # committed, over the sequential runs, net of idle
    seq_writes_per_run: float = float("nan")  # transaction ids consumed per sequential run
    stream: Phase | None = None  # chats streaming at once: CPU per streamed chunk
    stream_chunks: int = 0

    def per_chunk_us(self) -> float:
        """Server CPU per streamed chunk over the streaming phase, less its idle rate."""
        ph = self.stream
        if ph is None or not self.stream_chunks:
            return float("nan")
        return (ph.cpu_s - self.idle_cpu * ph.seconds) / self.stream_chunks * 1e6

    def per_run_ms(self, ph: Phase) -> float:
        """Server CPU per run over a phase, less its idle rate."""
        return (ph.cpu_s - self.idle_cpu * ph.seconds) / ph.runs * 1000

    def side_per_run_ms(self, ph: Phase) -> tuple[float, float]:
        """The broker's and PostgreSQL's CPU per run over a phase, less their idle rates."""
        broker = ph.broker_cpu_s - self.idle_broker_cpu * ph.seconds
        pg = ph.pg_cpu_s - self.idle_pg_cpu * ph.seconds
        return broker / ph.runs * 1000, pg / ph.runs * 1000


class Rig:
    """A server under test beside the others: its process, its database, its clients."""

    system = "threadgate"
    ready_path = "/readyz"
    with_breakdown = True

    def __init__(self, stack: Stack, label: str, server: Proc, database_url: str) -> None:
        self.stack, self.label, self.p, self.url = stack, label, server, database_url
        self.pc = PgCounters(stack.admin_url, database_name(database_url))
        self.result = VariantResult(label, {}, *(float("nan"),) * 5, system=self.system)

    def make(self, port: int, thread: str) -> Turns:
        return Poster(port, thread)

    def broker_cpu_s(self) -> float:
        assert self.stack.nats.proc is not None
        return proc_cpu_s(self.stack.nats.proc.pid)

    def side(self) -> tuple[float, float]:
        assert self.stack.pg.proc is not None
        return self.broker_cpu_s(), proc_tree_cpu_s(self.stack.pg.proc.pid)

    async def start(self) -> float:
        return await self.p.start()

    async def open(self) -> None:
        say(f"[{self.label}] ready in {await self.start():.1f}s")
        await run_phase(self.p, 1, 2, "warm", self.make, think_s=0)

    async def phase(self, level: int, rounds: int) -> None:
        r = self.result
        (x0, w0), t0 = self.pc.read(), time.monotonic()
        phase = await run_phase(self.p, level, rounds, self.label, self.make, side=self.side)
        if level == 10:
            t1 = time.monotonic()
            _, w1 = self.pc.read()
            await asyncio.sleep(PgCounters.SETTLE_S)
            (x1, _), t2 = self.pc.read(), time.monotonic()
            busy = (x1 - x0) - r.idle_xact_s * (t2 - t1)  # the settle's own idle polling
            r.load_xact_s = busy / (t1 - t0)
            r.load_xact_per_run = (busy - r.idle_xact_s * (t1 - t0)) / phase.runs
            r.load_writes_per_run = (w1 - w0) / phase.runs
        if self.with_breakdown:
            phase.breakdown = breakdown(self.url, phase.samples)
        r.phases[level] = phase
        xs = [s.ttfc for s in phase.samples]
        say(f"[{self.label}] {level:>3} threads: p50 {ms(pct(xs, 50))} ms  p99 {ms(pct(xs, 99))}")

    async def sequential(self, runs: int) -> None:
        """`runs` runs one at a time on one conversation (the 1-thread phase's shape, longer):
        CPU per run, and committed transactions per run (after a settle, net of idle)."""
        r = self.result
        (x0, w0), t0 = self.pc.read(), time.monotonic()
        ph = await run_phase(self.p, 1, runs, self.label, self.make, side=self.side)
        t1 = time.monotonic()
        _, w1 = self.pc.read()
        await asyncio.sleep(PgCounters.SETTLE_S)
        (x1, _), t2 = self.pc.read(), time.monotonic()
        idle = r.idle_xact_s if r.idle_xact_s == r.idle_xact_s else 0.0  # NaN: not measured
        r.seq_xact_per_run = ((x1 - x0) - idle * (t2 - t0)) / ph.runs
        r.seq_writes_per_run = (w1 - w0) / ph.runs
        r.sequential = ph
        say(
            f"[{self.label}] {ph.runs} sequential runs: {r.per_run_ms(ph):.1f} ms CPU/run,"
            f" {r.seq_xact_per_run:.1f} xact/run ({t1 - t0:.0f} s)"
        )

    async def streaming(self, chats: int, chunks: int, delay_ms: float) -> None:
        """`chats` conversations streaming at once, each one reply of `chunks` chunks at the
        mock's pace (`delay_ms` apart), one client attached each: CPU per streamed chunk."""
        tag = re.sub(r"[^A-Za-z0-9_-]", "", self.label)
        clients = [
            self.make(self.p.port, f"{tag}-s-{i}-{uuid.uuid4().hex[:6]}") for i in range(chats)
        ]
        for c in clients:
            await c.prepare()
        ph = Phase(chats, load=loadavg().split()[0])
        cpu0, t0 = self.p.cpu_s(), time.monotonic()
        b0, g0 = self.side()
        try:
            ph.samples = list(
                await asyncio.gather(*(c.turn(chunks, False, delay_ms) for c in clients))
            )
        finally:
            for c in clients:
                c.close()
        ph.seconds, ph.cpu_s = time.monotonic() - t0, self.p.cpu_s() - cpu0
        b1, g1 = self.side()
        ph.broker_cpu_s, ph.pg_cpu_s = b1 - b0, g1 - g0
        self.result.stream, self.result.stream_chunks = ph, chats * chunks
        say(
            f"[{self.label}] {chats} chats streaming: {self.result.per_chunk_us():.0f} µs CPU/chunk"
        )

    async def close(self) -> None:
        self.pc.close()
        await self.p.stop()


class PodRig(Rig):
    """One threadgate pod configuration on its own database."""

    def __init__(
        self,
        stack: Stack,
        label: str,
        *,
        polling_s: float | None,
        log_dir: Path,
        cmd: list[str] = SERVE,
        extra_env: dict[str, str] | None = None,
        tree: Path | None = None,
    ) -> None:
        db = f"ttfc_{re.sub(r'[^a-z0-9]', '', label.lower())[:40]}_{uuid.uuid4().hex[:6]}"
        url = stack.new_database(db)
        env = pod_env(url, stack.nats.url, polling_s=polling_s, delay_ms=0)
        env.update(extra_env or {})
        super().__init__(stack, label, pod(f"ttfc-{db}", env, log_dir, cmd, tree=tree), url)


async def idle_all(rigs: Sequence[Rig], window: float) -> None:
    """Every server idle in the same window: CPU over the window, committed transactions of
    each one's database over the window and a settle after it (idle.py's method), a readiness
    probe to each every 5 s."""
    await asyncio.sleep(PgCounters.SETTLE_S)  # let every backend flush its counters
    x0 = [r.pc.read()[0] for r in rigs]
    c0 = [(r.p.cpu_s(), r.broker_cpu_s()) for r in rigs]
    pg0, t0, load0 = rigs[0].side()[1], time.monotonic(), loadavg().split()[0]
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() - t0 < window:
            for r in rigs:
                await http.get(f"{r.p.url}{r.ready_path}")
            await asyncio.sleep(min(5.0, max(0.0, window - (time.monotonic() - t0))))
    span, load1 = time.monotonic() - t0, loadavg().split()[0]
    c1 = [(r.p.cpu_s(), r.broker_cpu_s()) for r in rigs]
    pg_cpu = (rigs[0].side()[1] - pg0) / span
    await asyncio.sleep(PgCounters.SETTLE_S)
    x1 = [r.pc.read()[0] for r in rigs]
    total = time.monotonic() - t0  # the settle's transactions are the same idle kind
    for r, a, b, (ca, ba), (cb, bb) in zip(rigs, x0, x1, c0, c1, strict=True):
        r.result.idle_xact_s = (b - a) / total
        r.result.idle_cpu = (cb - ca) / span
        r.result.idle_broker_cpu = (bb - ba) / span
        r.result.idle_pg_cpu = pg_cpu
        r.result.idle_load = f"{load0} → {load1}"
        say(f"[{r.label}] idle: {r.result.idle_cpu:.3f} cores, {r.result.idle_xact_s:.1f} xact/s")


async def compare(
    rigs: list[Rig], rounds: dict[int, int], idle_window: float, cpu_runs: int
) -> list[VariantResult]:
    """Several servers side by side: each phase runs on every one before the next phase, so
    that the machine's moods fall on all of them alike."""
    try:
        for rig in rigs:
            await rig.open()
        await idle_all(rigs, idle_window)
        for level in LEVELS:
            for rig in rigs if level in rounds else []:
                await rig.phase(level, rounds[level])
        for rig in rigs if cpu_runs else []:
            await rig.sequential(cpu_runs)
        return [rig.result for rig in rigs]
    finally:
        for rig in rigs:
            await rig.close()
