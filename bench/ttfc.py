"""Time to first chunk: POST sent → first `chunk` at a client that attaches as the POST returns.

An SSE client cannot attach before the POST (the thread has no run yet: 204; or it has an
earlier run, which attach would follow to its end), so the client attaches right after the
POST's 202 and the clock runs from the moment the POST is written. N threads post at the same
instant (a burst), round after round; each thread is a conversation (round k is its turn k),
so its tail on the pod is warm — the first round's cold figure is reported apart.

Also: PostgreSQL transactions per second of the pod's database idle and under the 10-thread
load (pg_stat_database.xact_commit deltas after a settle), per queue polling interval, and
where the time goes (from the run rows and DBOS's workflow_status).

    python -m bench.ttfc [--polling 0.05,0.02,0.01] [--quick] [--base REV] [--fast-start]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.harness import (
    SERVE,
    PgCounters,
    Proc,
    Stack,
    database_name,
    ms,
    pct,
    pod,
    pod_env,
    run_async,
    say,
    table,
    tree_at,
)
from bench.sse import HttpConn, attach

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


class Poster:
    """One conversation: a keep-alive connection for its POSTs, a fresh stream per run."""

    def __init__(self, port: int, thread: str) -> None:
        self.port = port
        self.thread = thread
        self.conn: HttpConn | None = None

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


async def run_phase(p: Proc, level: int, rounds: int, tag: str) -> Phase:
    """`rounds` bursts of `level` simultaneous POSTs; the first burst (cold) is kept apart."""
    tag = re.sub(r"[^A-Za-z0-9_-]", "", tag)
    posters = [Poster(p.port, f"{tag}-{level}-{i}-{uuid.uuid4().hex[:6]}") for i in range(level)]
    phase = Phase(level)
    cpu0, t0 = p.cpu_s(), time.monotonic()
    try:
        for r in range(rounds + 1):
            # A think time between turns, untimed: back-to-back turns last about one polling
            # interval and would lock onto the queue worker's phase (a steady, unfair wait).
            await asyncio.sleep(random.uniform(0.0, THINK_S))
            got = await asyncio.gather(*(x.turn(cold=r == 0) for x in posters))
            (phase.cold if r == 0 else phase.samples).extend(got)
    finally:
        for x in posters:
            x.close()
    phase.seconds = time.monotonic() - t0
    phase.cpu_s = p.cpu_s() - cpu0
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


class PodRig:
    """One pod configuration on its own database: its idle cost, then TTFC phases."""

    def __init__(
        self,
        stack: Stack,
        label: str,
        *,
        polling_s: float,
        log_dir: Path,
        cmd: list[str] = SERVE,
        extra_env: dict[str, str] | None = None,
        counters: bool = True,
        tree: Path | None = None,
    ) -> None:
        self.label, self.counters = label, counters
        db = f"ttfc_{re.sub(r'[^a-z0-9]', '', label.lower())}_{uuid.uuid4().hex[:6]}"
        self.url = stack.new_database(db)
        env = pod_env(self.url, stack.nats.url, polling_s=polling_s, delay_ms=0)
        env.update(extra_env or {})
        self.p = pod(f"ttfc-{db}", env, log_dir, cmd, tree=tree)
        self.pc = PgCounters(stack.admin_url, database_name(self.url))
        self.result = VariantResult(label, {}, *(float("nan"),) * 5)

    async def open(self) -> None:
        say(f"[{self.label}] pod ready in {await self.p.start():.1f}s")
        warm = Poster(self.p.port, f"warm-{uuid.uuid4().hex[:6]}")
        for _ in range(3):
            await warm.turn()
        warm.close()

    async def idle(self) -> None:
        if not self.counters:
            return
        await asyncio.sleep(PgCounters.SETTLE_S)  # let every backend flush its counters
        (x0, _), c0, t0 = self.pc.read(), self.p.cpu_s(), time.monotonic()
        await asyncio.sleep(5.0)
        (x1, _), c1, t1 = self.pc.read(), self.p.cpu_s(), time.monotonic()
        self.result.idle_xact_s, self.result.idle_cpu = (x1 - x0) / (t1 - t0), (c1 - c0) / (t1 - t0)

    async def phase(self, level: int, rounds: int) -> None:
        r = self.result
        (x0, w0), t0 = self.pc.read(), time.monotonic()
        phase = await run_phase(self.p, level, rounds, self.label)
        if self.counters and level == 10:
            t1 = time.monotonic()
            _, w1 = self.pc.read()
            await asyncio.sleep(PgCounters.SETTLE_S)
            (x1, _), t2 = self.pc.read(), time.monotonic()
            busy = (x1 - x0) - r.idle_xact_s * (t2 - t1)  # the settle's own idle polling
            runs = len(phase.samples) + len(phase.cold)
            r.load_xact_s = busy / (t1 - t0)
            r.load_xact_per_run = (busy - r.idle_xact_s * (t1 - t0)) / runs
            r.load_writes_per_run = (w1 - w0) / runs
        phase.breakdown = breakdown(self.url, phase.samples)
        r.phases[level] = phase
        xs = [s.ttfc for s in phase.samples]
        say(
            f"[{self.label}] {level:>3} threads: p50 {ms(pct(xs, 50))} ms  p99 {ms(pct(xs, 99))} ms"
        )

    async def close(self) -> None:
        self.pc.close()
        await self.p.stop()


async def measure_pod(
    stack: Stack, label: str, *, rounds: dict[int, int], **kw: Any
) -> VariantResult:
    """One pod configuration, start to finish: idle cost, then the TTFC phases."""
    rig = PodRig(stack, label, **kw)
    try:
        await rig.open()
        await rig.idle()
        for level in LEVELS:
            if level in rounds:
                await rig.phase(level, rounds[level])
        return rig.result
    finally:
        await rig.close()


async def compare(stack: Stack, rigs: list[PodRig], rounds: dict[int, int]) -> list[VariantResult]:
    """Several pods side by side: each phase runs on every pod before the next phase, so
    that the machine's moods fall on all of them alike."""
    try:
        for rig in rigs:
            await rig.open()
        for rig in rigs:
            await rig.idle()
        for level in LEVELS:
            for rig in rigs if level in rounds else []:
                await rig.phase(level, rounds[level])
        return [rig.result for rig in rigs]
    finally:
        for rig in rigs:
            await rig.close()


def ttfc_table(results: list[VariantResult]) -> str:
    rows = []
    for r in results:
        for level, ph in r.phases.items():
            xs = [s.ttfc for s in ph.samples]
            rows.append(
                [
                    r.label,
                    level,
                    len(xs),
                    ms(pct(xs, 50)),
                    ms(pct(xs, 99)),
                    ms(pct([s.post for s in ph.samples], 50)),
                    ms(pct([s.ttfc for s in ph.cold], 50)),
                    f"{ph.cpu_s / ph.seconds * 100:.0f} %",
                    f"{(ph.cpu_s - r.idle_cpu * ph.seconds) / (len(ph.samples) + len(ph.cold)) * 1000:.1f}",
                ]
            )
    return table(
        [
            "variant",
            "threads",
            "samples",
            "TTFC p50 ms",
            "TTFC p99 ms",
            "POST p50 ms",
            "first turn p50 ms",
            "pod CPU",
            "pod CPU ms per run (net of idle)",
        ],
        rows,
    )


def breakdown_table(results: list[VariantResult]) -> str:
    rows = []
    for r in results:
        for level, ph in r.phases.items():
            rows.append([r.label, level, *(ms(v) for v in ph.breakdown.values())])
    legs = next(iter(results[0].phases.values())).breakdown.keys()
    return table(["variant", "threads", *(f"{k} ms" for k in legs)], rows)


def cost_table(results: list[VariantResult]) -> str:
    rows = [
        [
            r.label,
            f"{r.idle_xact_s:.0f}",
            f"{r.idle_cpu * 100:.1f} %",
            f"{r.load_xact_s:.0f}",
            f"{r.load_xact_per_run:.1f}",
            f"{r.load_writes_per_run:.1f}",
        ]
        for r in results
    ]
    return table(
        [
            "variant",
            "idle xact/s",
            "idle pod CPU",
            "xact/s at 10 threads",
            "xact per run",
            "write xacts per run",
        ],
        rows,
    )


async def main(
    polling: list[float],
    quick: bool,
    base: str | None = None,
    fast_start: bool = False,
    env: Sequence[str] = (),
) -> str:
    rounds = {1: 10, 10: 3, 100: 1} if quick else {1: 20, 10: 6, 100: 1}
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    results = []
    with Stack() as stack:
        if base is not None or fast_start or env:  # side by side, phase by phase
            p = polling[0]
            rigs = [PodRig(stack, f"this tree, poll={p}", polling_s=p, log_dir=log_dir)]
            if base is not None:  # before/after: the base revision's pod too
                sha, tree = tree_at(base)
                label = f"base {sha}, poll={p}"
                rigs.insert(0, PodRig(stack, label, polling_s=p, log_dir=log_dir, tree=tree))
            for knob in env:
                k, v = knob.split("=", 1)
                label = f"this tree, {k.removeprefix('THREADGATE_').lower()}={v}, poll={p}"
                rigs.append(PodRig(stack, label, polling_s=p, log_dir=log_dir, extra_env={k: v}))
            if fast_start:
                fast = {"THREADGATE_FAST_START": "true"}
                label = f"this tree, fast start, poll={p}"
                rigs.append(PodRig(stack, label, polling_s=p, log_dir=log_dir, extra_env=fast))
            results += await compare(stack, rigs, rounds)
        for p in polling if base is None and not fast_start and not env else []:
            results.append(
                await measure_pod(stack, f"poll={p}", polling_s=p, log_dir=log_dir, rounds=rounds)
            )
    say(f"pod logs in {log_dir}")
    at10 = {r.label: r.phases[10].samples for r in results if 10 in r.phases}
    best = min(at10, key=lambda k: pct([s.ttfc for s in at10[k]], 50))
    p50 = pct([s.ttfc for s in at10[best]], 50)
    p99 = pct([s.ttfc for s in at10[best]], 99)
    verdict = (
        f"Target at 10 threads: p50 ≤ 25 ms and p99 ≤ 100 ms. Best here: {best}, "
        f"p50 {ms(p50)} ms, p99 {ms(p99)} ms — "
        + ("met." if p50 <= 0.025 and p99 <= 0.1 else "not met.")
    )
    return "\n\n".join(
        [
            "## Time to first chunk, side by side (before/after, fast start)"
            if base is not None or fast_start or env
            else "## Time to first chunk (stock pod, per queue polling interval)",
            "POST written → first `chunk` event read by a client that attaches as soon as the "
            f"202 is read. {CHUNKS}-chunk replies, mock delay 0; N threads post in the same "
            "instant, round after round (each thread a conversation; the first round, a new "
            "thread with a cold tail, is the 'first turn' column), with a random pause of "
            f"0-{THINK_S * 1000:.0f} ms before each burst (untimed; without it back-to-back "
            "turns lock onto the queue poll's phase). One pod, PostgreSQL with default "
            "durability (fsync on), client on the same 2 cores. 'pod CPU ms per run' = the "
            "pod's CPU time over the phase, less its idle rate (polling), / runs.",
            ttfc_table(results),
            verdict,
            "Where the time goes (medians; wall clock of this host; `row` = the run row's "
            "insert, `enq` = DBOS workflow row created, `deq` = claimed by a queue poll, "
            "`step` = the reply step began):",
            breakdown_table(results),
            "PostgreSQL cost of the pod's database (pg_stat_database.xact_commit deltas, read "
            f"after {PgCounters.SETTLE_S:.0f} s settles; idle window 5 s; 'write xacts' = "
            "transaction ids consumed):",
            cost_table(results),
        ]
    )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--polling", default="0.05,0.02,0.01")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--base", metavar="REV", help="before/after: a pod of git revision REV too")
    ap.add_argument("--fast-start", action="store_true", help="a THREADGATE_FAST_START pod too")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="a pod with K=V too")
    args = ap.parse_args()
    polling = [float(x) for x in args.polling.split(",")]
    print(run_async(lambda: main(polling, args.quick, args.base, args.fast_start, args.env)))


if __name__ == "__main__":
    cli()
