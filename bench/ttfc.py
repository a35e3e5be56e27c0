"""Time to first chunk: POST sent → first `chunk` at a client that attaches as the POST returns.

An SSE client cannot attach before the POST (the thread has no run yet: 204; or it has an
earlier run, which attach would follow to its end), so the client attaches right after the
POST's 202 and the clock runs from the moment the POST is written. N threads post at the same
instant (a burst), round after round; each thread is a conversation (round k is its turn k),
so its tail on the pod is warm — the first round's cold figure is reported apart.

Also: each server's CPU per run (in the bursts, and over sequential runs with no pause), its
broker's (nats-server, Redis) and PostgreSQL's; idle cost (server CPU and committed
transactions/s of its database, all servers idle in the same window, a readiness probe every
5 s as a kubelet would); PostgreSQL transactions per run under the 10-thread load; where the
time goes (from the run rows and DBOS's workflow_status).

    python -m bench.ttfc [--polling 0.05,0.02,0.01|default] [--quick] [--base REV]
                         [--fast-start] [--env K=V] [--langgraph-pg] [--rounds 1:20,10:10]
                         [--idle-window S] [--cpu-runs N]

`--polling default` leaves THREADGATE_QUEUE_POLLING_S unset: each pod runs on its own revision's
default. `--langgraph-pg` adds LangGraph's agent server on its Postgres+Redis runtime
(bench/peers_langgraph_pg.py) in both client shapes, side by side with the pods.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

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
    run_async,
    say,
    tree_at,
)
from bench.sse import HttpConn, attach

CHUNKS = 5  # a short reply: the first chunk is what is timed
THINK_S = 0.1  # a random pause of up to this before each burst (not timed)
LEVELS = (1, 10, 100)
PROTO = [sys.executable, "-m", "bench.proto_pod"]


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
    async def turn(self, chunks: int = CHUNKS, cold: bool = False) -> Sample: ...
    def close(self) -> None: ...


class Poster:
    """One conversation: a keep-alive connection for its POSTs, a fresh stream per run."""

    def __init__(self, port: int, thread: str) -> None:
        self.port = port
        self.thread = thread
        self.conn: HttpConn | None = None

    async def prepare(self) -> None:
        pass

    async def turn(self, chunks: int = CHUNKS, cold: bool = False) -> Sample:
        if self.conn is None or self.conn.lost.done():
            self.conn = await HttpConn.open(self.port)
        body = {"input": "hello", "model_options": {"chunks": chunks, "delay_ms": 0}}
        wall0, t0 = time.time(), time.perf_counter()
        resp = await self.conn.request("POST", f"/threads/{self.thread}/runs", body)
        t_post = time.perf_counter()
        if resp.status != 202:
            raise RuntimeError(f"POST {resp.status}: {resp.body[:300]!r}")
        run_id = resp.json()["run_id"]
        stream, sconn = await attach(self.port, f"/threads/{self.thread}/attach", keep=False)
        try:
            assert stream.finished is not None
            await asyncio.wait_for(stream.finished, 60)
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
        CPU per run."""
        ph = await run_phase(self.p, 1, runs, self.label, self.make, side=self.side)
        self.result.sequential = ph
        say(
            f"[{self.label}] {ph.runs} sequential runs: {self.result.per_run_ms(ph):.1f} ms CPU/run"
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


async def measure_pod(
    stack: Stack, label: str, *, rounds: dict[int, int], idle_window: float, **kw: Any
) -> VariantResult:
    """One pod configuration, start to finish: idle cost, then the TTFC phases."""
    rig = PodRig(stack, label, **kw)
    try:
        await rig.open()
        await idle_all([rig], idle_window)
        for level in LEVELS:
            if level in rounds:
                await rig.phase(level, rounds[level])
        return rig.result
    finally:
        await rig.close()


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


async def main(args: argparse.Namespace) -> str:
    from bench import ttfc_report

    polling: list[float | None] = [
        None if x == "default" else float(x) for x in args.polling.split(",")
    ]
    rounds = {1: 10, 10: 3, 100: 1} if args.quick else {1: 20, 10: 6, 100: 1}
    if args.rounds:
        rounds = {int(k): int(v) for k, v in (x.split(":") for x in args.rounds.split(","))}
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    side_by_side = bool(args.base or args.fast_start or args.env or args.langgraph_pg or args.proto)
    results: list[VariantResult] = []
    notes: list[str] = []
    load0 = loadavg()
    with Stack() as stack:
        if side_by_side:
            p = polling[0]
            poll = "defaults" if p is None else f"poll={p}"
            kw: dict[str, Any] = {"polling_s": p, "log_dir": log_dir}
            rigs: list[Rig] = [PodRig(stack, f"this tree, {poll}", **kw)]
            if args.base is not None:  # before/after: the base revision's pod too
                sha, tree = tree_at(args.base)
                rigs.insert(0, PodRig(stack, f"base {sha}, {poll}", tree=tree, **kw))
            for knob in args.env:
                k, v = knob.split("=", 1)
                label = f"this tree, {k.removeprefix('THREADGATE_').lower()}={v}, {poll}"
                rigs.append(PodRig(stack, label, extra_env={k: v}, **kw))
            for path in args.proto:  # a prototype of a product change, bench/proto_pod.py
                label = f"this tree + proto_pod {path}, {poll}"
                proto = {"BENCH_START_PATH": path}
                rigs.append(PodRig(stack, label, cmd=PROTO, extra_env=proto, **kw))
            if args.fast_start:
                fast = {"THREADGATE_FAST_START": "true"}
                rigs.append(PodRig(stack, f"this tree, fast start, {poll}", extra_env=fast, **kw))
            if args.langgraph_pg:
                from bench.peers_langgraph_pg import langgraph_rigs

                got, note = await langgraph_rigs(stack, log_dir, args.langgraph_shapes.split(","))
                rigs += got
                notes.append(note)
            results += await compare(rigs, rounds, args.idle_window, args.cpu_runs)
        for p in [] if side_by_side else polling:
            label = f"poll={p}" if p is not None else "poll=default"
            results.append(
                await measure_pod(
                    stack,
                    label,
                    polling_s=p,
                    log_dir=log_dir,
                    rounds=rounds,
                    idle_window=args.idle_window,
                )
            )
        with psycopg.connect(stack.admin_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg_version = f"PostgreSQL {row[0] if row else '?'}"
    say(f"logs in {log_dir}")
    load1 = loadavg()
    return ttfc_report.report(
        results,
        side_by_side=side_by_side,
        idle_window=args.idle_window,
        notes=[*notes, f"{pg_version} (the bench's own, shared by every server)."],
        load=(load0, load1),
    )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--polling", default="0.05,0.02,0.01", help="seconds, or 'default' (unset)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", help="threads:bursts,... e.g. 1:20,10:10 (overrides --quick)")
    ap.add_argument("--base", metavar="REV", help="before/after: a pod of git revision REV too")
    ap.add_argument("--fast-start", action="store_true", help="a THREADGATE_FAST_START pod too")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="a pod with K=V too")
    ap.add_argument("--proto", action="append", default=[], metavar="PATH", help="a proto_pod")
    ap.add_argument("--langgraph-pg", action="store_true", help="LangGraph pg as a peer too")
    ap.add_argument("--langgraph-shapes", default="join,stream", help="join and/or stream")
    ap.add_argument("--idle-window", type=float, default=10.0, help="seconds, all servers idle")
    ap.add_argument("--cpu-runs", type=int, default=0, help="sequential runs for CPU per run")
    args = ap.parse_args()
    print(run_async(lambda: main(args)))


if __name__ == "__main__":
    cli()
