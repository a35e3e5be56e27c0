"""Capacity: how many chats one pod streams at an LLM's pace before its clients fall behind.

A level of N: N chat slots on one pod, each running chats back to back, every chat streaming
`--chunks` chunks at `--rate` chunks/s (400 at 40/s: 10 s, a chat's duration D) from
bench/paced_source.py, with one SSE client attached. Slot i begins at i/N of D, so from D to
2D exactly N chats stream at every moment while new ones keep arriving (N per D): a steady
state, which is what is judged. Every chunk carries the wall-clock time it was due at the
source; its client stamps its arrival: lag = arrival - due, for every chunk, whether it came
alone or merged with others into one event. N is raised level by level until the p99 lag of
the steady window passes 250 ms or a reply is incomplete; the largest passing N is the pod's
capacity.

Per level: lag p50/p99/max, the pod's CPU (cores) and RSS growth in the steady window, per
active chat and per chunk. `--base REV` runs a pod of an older revision (bench.harness.tree_at)
side by side, level by level, interleaved; `--env K=V` a pod of this tree with that setting.
`--profile N` samples every pod with py-spy (bench/profile.py) in the steady window of a
level of N. The time to first chunk of a lone run on an idle pod is measured first
(coalescing must not delay it). Figures only, no asserts.

    python -m bench.capacity [--levels 50,100,...] [--base REV] [--env K=V] [--profile N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    Others,
    Proc,
    Stack,
    calm,
    machine,
    pct,
    pod,
    pod_env,
    run_async,
    say,
    table,
    tree_at,
)
from bench.sse import HttpConn, attach

LAG_LIMIT_MS = 250.0
TOKEN = re.compile(r"(\d+)@([\d.]+) ")
REPO = Path(__file__).resolve().parents[1]
# No limit of the pod's may refuse a run or a client of the bench (each has a default that
# a bench of hundreds of chats from one anonymous caller would hit).
UNLIMITED = {
    "max_active_runs_per_principal": 100_000,
    "max_active_runs_per_pod": 100_000,
    "max_attach_per_pod": 100_000,
    "max_attach_per_principal": 100_000,
    "max_queued_runs_per_thread": 1000,
}


@dataclass
class Level:
    """N chat slots on one pod: each slot runs chats back to back, its first starting at
    i/N of a chat's duration D, so that N chats stream at every moment of [D, 2D] while new
    ones keep starting (N per D, as in a steady state). That window is what is judged."""

    n: int
    lags: list[float] = field(default_factory=list)  # ms, chunks due in the steady window
    all_lags: list[float] = field(default_factory=list)  # ms, every chunk
    chats: int = 0
    complete: int = 0  # chats with every chunk once, in order, then a successful done
    events: int = 0  # chunk events received (fewer than chunks when merged)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the steady window
    pod_cpu_s: float = 0.0  # ... the pod's CPU in it
    client_cpu_s: float = 0.0
    rss_before_kb: int = 0
    rss_peak_kb: int = 0
    others: float = 0.0  # cores other processes used meanwhile (a shared machine)

    @property
    def p99(self) -> float:
        return pct(self.lags, 99)

    @property
    def passed(self) -> bool:
        return self.complete == self.chats and not self.failures and self.p99 <= LAG_LIMIT_MS


async def one_chat(
    p: Proc, thread: str, chunks: int, rate: float, level: Level, wall_off: float
) -> list[tuple[float, float]]:
    """Post a run, attach, check the reply; [(due, lag ms)] of its chunks."""
    got: list[tuple[float, float]] = []
    seen = 0
    ok = True
    level.chats += 1

    def on_event(t: float, ev: str, data: bytes, eid: str | None) -> None:
        nonlocal seen, ok
        if ev == "chunk":
            level.events += 1
            arrived = (t + wall_off) * 1000
            for i, due in TOKEN.findall(json.loads(data)["text"]):
                ok = ok and int(i) == seen
                seen += 1
                got.append((float(due), arrived - float(due)))
        elif ev in ("reset", "run_started") and seen:
            ok = False  # a regenerated attempt: not what a capacity level should show

    conn = await HttpConn.open(p.port)
    try:
        body = {"input": "go", "model_options": {"chunks": chunks, "rate": rate}}
        resp = await conn.request("POST", f"/threads/{thread}/runs", body)
        if resp.status not in (200, 202):
            level.failures.append(f"POST {resp.status}: {resp.body[:200]!r}")
            return got
        stream, sconn = await attach(
            p.port, f"/threads/{thread}/attach", keep=False, on_event=on_event
        )
        try:
            assert stream.finished is not None
            await asyncio.wait_for(stream.finished, chunks / rate + 120)
        finally:
            sconn.close()
    except Exception as exc:
        level.failures.append(f"{thread}: {exc!r}")
        return got
    finally:
        conn.close()
    if ok and seen == chunks:
        level.complete += 1
    else:
        level.failures.append(f"{thread}: {seen} of {chunks} chunks, in order: {ok}")
    return got


async def run_level(
    p: Proc, n: int, chunks: int, rate: float, tag: str, per_slot: int = 2
) -> Level:
    level = Level(n)
    wall_off = time.time() - time.perf_counter()
    duration = chunks / rate
    level.rss_before_kb = p.rss_kb()
    peak = level.rss_before_kb
    start_wall = time.time()

    async def slot(i: int) -> list[tuple[float, float]]:
        await asyncio.sleep(duration * i / n)
        got = []
        for k in range(per_slot):
            got += await one_chat(p, f"cap-{tag}-{n}-{i}-{k}", chunks, rate, level, wall_off)
        return got

    async def steady() -> None:
        """The pod's CPU and RSS over [D, 2D]."""
        nonlocal peak
        await asyncio.sleep(duration)
        cpu0, ccpu0, t0 = p.cpu_s(), time.process_time(), time.monotonic()
        while time.monotonic() - t0 < duration:
            peak = max(peak, p.rss_kb())
            await asyncio.sleep(0.25)
        level.seconds = time.monotonic() - t0
        level.pod_cpu_s = p.cpu_s() - cpu0
        level.client_cpu_s = time.process_time() - ccpu0

    watcher = asyncio.create_task(steady())
    results = await asyncio.gather(*(slot(i) for i in range(n)))
    await watcher
    level.rss_peak_kb = peak
    window = ((start_wall + duration) * 1000, (start_wall + 2 * duration) * 1000)
    for got in results:
        for due, lag in got:
            level.all_lags.append(lag)
            if window[0] <= due <= window[1]:
                level.lags.append(lag)
    return level


async def first_chunk(p: Proc) -> float:
    """POST written → first chunk at a client attached once the POST returned (seconds)."""
    thread = f"ttfc-{uuid.uuid4().hex[:8]}"
    conn = await HttpConn.open(p.port)
    try:
        t0 = time.perf_counter()
        body = {"input": "go", "model_options": {"chunks": 3, "rate": 40}}
        resp = await conn.request("POST", f"/threads/{thread}/runs", body)
        assert resp.status == 202, resp.body
        stream, sconn = await attach(p.port, f"/threads/{thread}/attach")
        assert stream.finished is not None
        await asyncio.wait_for(stream.finished, 30)
        sconn.close()
        assert stream.first_chunk is not None
        return stream.first_chunk - t0
    finally:
        conn.close()


async def idle_ttfc(pods: dict[str, Proc], runs: int = 20) -> dict[str, list[float]]:
    """The first chunk of a lone run on an otherwise idle pod, each pod in turn (so that the
    machine's noise falls on all alike)."""
    out: dict[str, list[float]] = {label: [] for label in pods}
    for _ in range(runs):
        for label, p in pods.items():
            out[label].append(await first_chunk(p))
            await asyncio.sleep(0.1)  # idle between runs
    return out


def py_spy_available() -> bool:
    from bench.profile import py_spy

    try:
        py_spy()
        return True
    except SystemExit:
        return False


def row(label: str, lv: Level) -> list[object]:
    cores = lv.pod_cpu_s / lv.seconds if lv.seconds else 0.0
    chunks = len(lv.lags)
    grown = max(lv.rss_peak_kb - lv.rss_before_kb, 0)
    return [
        label,
        lv.n,
        f"{lv.complete}/{lv.chats}",
        f"{lv.events / max(lv.complete, 1):.0f}",
        f"{pct(lv.lags, 50):.0f} / {lv.p99:.0f} / {max(lv.lags, default=float('nan')):.0f}",
        f"{pct(lv.all_lags, 99):.0f}",
        f"{cores:.2f}",
        f"{cores / lv.n * 100:.2f} %",
        f"{lv.pod_cpu_s / max(chunks, 1) * 1e6:.0f} µs",
        f"{lv.rss_peak_kb / 1024:.0f} MiB",
        f"{grown / lv.n:.0f} KiB",
        f"{lv.client_cpu_s / lv.seconds if lv.seconds else 0.0:.2f}",
        f"{lv.others:.2f}",
        "pass" if lv.passed else "FAIL" + (f" ({lv.failures[0][:60]})" if lv.failures else ""),
    ]


async def main(args: argparse.Namespace) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    info = machine()
    labels = ["this tree"]
    trees: dict[str, Path | None] = {"this tree": None}
    variants: dict[str, dict[str, str]] = {"this tree": {}}
    for kv in args.env:
        key, _, value = kv.partition("=")
        label = f"this tree, {key.lower()}={value}"
        labels.append(label)
        trees[label], variants[label] = None, {f"THREADGATE_{key.upper()}": value}
    if args.base:
        sha, tree = tree_at(args.base)
        labels.insert(0, f"base {sha}")
        trees[labels[0]] = tree
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[str, list[Level]] = {label: [] for label in labels}
    ttfc: dict[str, list[float]] = {}
    profiles: dict[str, tuple[str, str, int]] = {}
    with Stack() as stack:
        pods: dict[str, Proc] = {}
        for i, label in enumerate(labels):
            url = stack.new_database(f"cap_{i}_{uuid.uuid4().hex[:6]}")
            env = pod_env(
                url,
                stack.nats.url,
                model="bench.paced_source:make",
                log_level="WARNING",
                **UNLIMITED,
            )
            # The source is imported from this checkout, whichever tree runs the pod.
            tree = trees[label]
            env["PYTHONPATH"] = os.pathsep.join(str(x) for x in (tree, REPO) if x)
            env.update(variants.get(label, {}))
            pods[label] = pod(f"cap-{i}", env, log_dir, tree=tree)
            pods[label].env["PYTHONPATH"] = env["PYTHONPATH"]
        try:
            for p in pods.values():
                await p.start()
                await run_level(p, 10, 20, 40, "warm", per_slot=1)
            await calm(args.quiet_wait)
            ttfc = await idle_ttfc(pods)
            for label in labels:
                median = statistics.median(ttfc[label]) * 1000
                say(f"[{label}] idle first chunk p50 {median:.1f} ms")
            ramping = set(labels)
            for n in levels:
                for label in labels:
                    if label not in ramping:
                        continue
                    await calm(args.quiet_wait)
                    others = Others()
                    lv = await run_level(
                        pods[label], n, args.chunks, args.rate, uuid.uuid4().hex[:6]
                    )
                    lv.others = others.cores()
                    results[label].append(lv)
                    say(f"[{label}] " + " | ".join(str(c) for c in row(label, lv)[1:]))
                    if not lv.passed:
                        ramping.discard(label)
                if not ramping:
                    break
            if args.profile:
                from bench.profile import record, summarize

                if py_spy_available():
                    for label, p in pods.items():
                        raw = log_dir / f"pyspy-{p.name}.raw"
                        seconds = args.chunks / args.rate
                        level_task = asyncio.create_task(
                            run_level(p, args.profile, args.chunks, args.rate, "prof")
                        )
                        await asyncio.sleep(seconds)  # the steady window: all N streaming
                        spy = await record(p.pid, seconds, raw)
                        await asyncio.wait_for(spy.wait(), 120)
                        await level_task
                        comp, own, total = summarize(raw, 14)
                        profiles[label] = (comp, own, total)
                else:
                    say("py-spy not installed: no profile (pip install py-spy)")
        finally:
            for p in pods.values():
                await p.stop()
    return report(args, info, labels, results, ttfc, profiles)


def report(
    args: argparse.Namespace,
    info: dict[str, str],
    labels: list[str],
    results: dict[str, list[Level]],
    ttfc: dict[str, list[float]],
    profiles: dict[str, tuple[str, str, int]],
) -> str:
    rows = []
    for i in range(max(len(v) for v in results.values())):  # level by level, as they ran
        rows += [row(label, results[label][i]) for label in labels if i < len(results[label])]
    best = {label: max((lv.n for lv in results[label] if lv.passed), default=0) for label in labels}
    capacity = [
        [
            label,
            best[label],
            f"{statistics.median(ttfc[label]) * 1000:.1f} / {pct(ttfc[label], 90) * 1000:.1f} ms",
        ]
        for label in labels
    ]
    out = [
        f"## Capacity: concurrent chats per pod at {args.rate:.0f} chunks/s",
        f"Each chat: {args.chunks} chunks at {args.rate:.0f}/s from bench/paced_source.py (an "
        "LLM's pace on an absolute schedule), one SSE client attached. N slots run two chats "
        "each back to back, slot i starting at i/N of a chat's duration D: from D to 2D, N "
        "chats stream at every moment and N new ones start (the steady window, which is "
        "judged). Lag = chunk due at the source → read by its client; a level passes when "
        f"every reply is complete and in order and the window's p99 ≤ {LAG_LIMIT_MS:.0f} ms. "
        "CPU in cores over the window (2 cores on this machine, shared with NATS, PostgreSQL "
        "and the bench client, and on a shared machine with other processes: 'others' CPU', "
        "measured during the level); RSS per chat = growth over the idle pod / N.",
        table(
            [
                "pod",
                "N",
                "complete",
                "events per reply",
                "window lag p50 / p99 / max ms",
                "p99, every chunk ms",
                "pod CPU",
                "CPU per chat",
                "pod CPU per chunk",
                "pod RSS peak",
                "RSS per chat",
                "client CPU",
                "others' CPU",
                "",
            ],
            rows,
        ),
        table(
            ["pod", "largest N passing", "first chunk, idle pod: p50 / p90 of 20, in turns"],
            capacity,
        ),
    ]
    base = next((label for label in labels if label.startswith("base ")), None)
    if base and best[base]:
        out.append(
            "; ".join(
                f"{label}: {best[label] / best[base]:.1f}x the base's N"
                for label in labels
                if label != base
            )
            + "."
        )
    for label, (comp, own, total) in profiles.items():
        out += [
            f"Pod profile, {label}, N={args.profile} ({total} samples, py-spy --gil):",
            comp,
            own,
        ]
    out.append(
        f"_Machine: {info['nproc']} cores ({info['cpu']}), {info['ram']}, {info['date']}, load "
        f"before {info['load before']}. Command: `python -m bench.capacity --levels "
        f"{args.levels}"
        + (f" --base {args.base}" if args.base else "")
        + "".join(f" --env {kv}" for kv in args.env)
        + (f" --profile {args.profile}" if args.profile else "")
        + "`._"
    )
    return "\n\n".join(out)


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="25,50,100,150,200,300,400,500,600,800,1000")
    ap.add_argument("--chunks", type=int, default=400)
    ap.add_argument("--rate", type=float, default=40.0)
    ap.add_argument("--base", metavar="REV", help="before/after: a pod of git revision REV too")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="a pod of this tree with THREADGATE_K=V too (repeatable: one pod per --env)",
    )
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="py-spy at N chats")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        metavar="S",
        help="before each level, wait up to S seconds until other processes use < 0.3 cores",
    )
    args = ap.parse_args()

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the stack and the pods are stopped on the way out

    signal.signal(signal.SIGTERM, stop)
    print(run_async(lambda: main(args)))


if __name__ == "__main__":
    cli()
