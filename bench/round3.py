"""Round 3, side by side in one run: issue 29's figures for threadgate against LangGraph pg.

Rigs (bench/rigs.py), each on a database of its own, all on one stack: this tree's pod as one
process, this tree's pod of THREADGATE_PROCESSES processes (the shipped layout), optionally a
pod of a git revision (`--base`), and LangGraph's agent server on its Postgres+Redis runtime
in its two client shapes (bench/peers_langgraph_pg.py: it installs its own virtualenv under
bench/.peers and Redis with apt-get). Each phase runs on every rig before the next phase:

1. idle, all at once: server CPU (cores, its whole process tree) and its database's
   committed transactions per second, a readiness probe every 5 s;
2. first chunk: bursts of 1 and of 10 threads posting at once (p50, p99);
3. sequential runs (5 chunks, one attach each): server CPU per run, its broker's and
   PostgreSQL's, and committed transactions per run (after a settle, net of idle);
4. streaming: chats at once at a model's pace, one client each: server CPU per chunk.

Then issue 29's targets, each against LangGraph pg's best shape of the same run. CPU-time and
transaction figures hold on a busy machine; latencies do not (the load average is printed
with each phase): for the latencies, run this on a quiet machine.

    python -m bench.round3 [--quick] [--processes 2] [--base REV] [--no-langgraph]
"""

from __future__ import annotations

import argparse
import math
import uuid
from collections.abc import Sequence
from pathlib import Path

import psycopg

from bench import ttfc_report
from bench.harness import Stack, loadavg, machine, ms, pct, run_async, say, table, tree_at
from bench.rigs import CHUNKS, PodRig, Rig, VariantResult, idle_all

TARGETS = {
    "cpu_per_run_ms": 12.0,
    "ttfc1_ratio": 0.5,
    "ttfc10_ratio": 0.6,
    "xact_per_run": 10.0,
    "chunk_us": 130.0,
    "all_three_ratio": 0.5,
}


async def measure(
    rigs: list[Rig],
    *,
    rounds: dict[int, int],
    idle_window: float,
    cpu_runs: int,
    chats: int,
    chunks: int,
    delay_ms: float,
) -> list[VariantResult]:
    try:
        for rig in rigs:
            await rig.open()
        await idle_all(rigs, idle_window)
        for level, n in rounds.items():
            for rig in rigs:
                await rig.phase(level, n)
        for rig in rigs:
            await rig.sequential(cpu_runs)
        for rig in rigs:
            await rig.streaming(chats, chunks, delay_ms)
        return [rig.result for rig in rigs]
    finally:
        for rig in rigs:
            await rig.close()


def _f(x: float, digits: int = 1) -> str:
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def _p50(r: VariantResult, level: int) -> float:
    ph = r.phases.get(level)
    return pct([s.ttfc for s in ph.samples], 50) if ph else math.nan


def _all_three(r: VariantResult) -> float:
    ph = r.sequential
    if ph is None:
        return math.nan
    broker, pg = r.side_per_run_ms(ph)
    return r.per_run_ms(ph) + broker + pg


def summary_table(results: Sequence[VariantResult]) -> str:
    rows = []
    for r in results:
        seq = r.sequential
        rows.append(
            [
                r.label,
                f"**{_f(r.per_run_ms(seq))}**" if seq else "—",
                ms(_p50(r, 1)),
                ms(_p50(r, 10)),
                _f(r.seq_xact_per_run),
                _f(r.per_chunk_us(), 0),
                f"{r.idle_cpu:.3f}",
                _f(r.idle_xact_s, 2),
                _f(_all_three(r)),
            ]
        )
    return table(
        [
            "server",
            f"server CPU ms per run (sequential, {CHUNKS} chunks, one attach)",
            "first chunk p50 ms, 1 thread",
            "first chunk p50 ms, 10 threads",
            "committed xact per run",
            "server CPU µs per streamed chunk",
            "idle server CPU (cores)",
            "idle committed xact/s",
            "server + broker + PostgreSQL CPU ms per run",
        ],
        rows,
    )


def targets_table(results: Sequence[VariantResult]) -> str:
    """Issue 29's targets for each of this tree's pods against LangGraph pg's best shape."""
    peers = [r for r in results if r.system != "threadgate"]
    ours = [r for r in results if r.label.startswith("this tree")]
    if not ours:
        return ""

    def best(values: list[float]) -> float:
        values = [v for v in values if not math.isnan(v)]
        return min(values) if values else math.nan

    lg1 = best([_p50(r, 1) for r in peers])
    lg10 = best([_p50(r, 10) for r in peers])
    lg_idle_cpu = best([r.idle_cpu for r in peers])
    lg_idle_x = best([r.idle_xact_s for r in peers])
    lg_three = best([_all_three(r) for r in peers])

    def yes(ok: bool, *values: float) -> str:
        if any(math.isnan(v) for v in values):
            return "—"
        return "**yes**" if ok else "**no**"

    t = TARGETS
    rows = []
    for r in ours:
        cpu = r.per_run_ms(r.sequential) if r.sequential else math.nan
        one, ten, three = _p50(r, 1), _p50(r, 10), _all_three(r)
        rows += [
            [
                r.label,
                f"pod CPU per run ≤ {t['cpu_per_run_ms']:.0f} ms",
                f"{_f(cpu)} ms",
                yes(cpu <= t["cpu_per_run_ms"], cpu),
            ],
            [
                r.label,
                f"first chunk p50, 1 thread ≤ {t['ttfc1_ratio']}x LangGraph pg's best",
                f"{ms(one)} vs {ms(lg1)} ms: {_f(one / lg1, 2)}x",
                yes(one <= t["ttfc1_ratio"] * lg1, one, lg1),
            ],
            [
                r.label,
                f"first chunk p50, 10 threads ≤ {t['ttfc10_ratio']}x LangGraph pg's best",
                f"{ms(ten)} vs {ms(lg10)} ms: {_f(ten / lg10, 2)}x",
                yes(ten <= t["ttfc10_ratio"] * lg10, ten, lg10),
            ],
            [
                r.label,
                f"committed transactions per run ≤ {t['xact_per_run']:.0f}",
                _f(r.seq_xact_per_run),
                yes(r.seq_xact_per_run <= t["xact_per_run"], r.seq_xact_per_run),
            ],
            [
                r.label,
                f"CPU per streamed chunk ≤ {t['chunk_us']:.0f} µs",
                f"{_f(r.per_chunk_us(), 0)} µs",
                yes(r.per_chunk_us() <= t["chunk_us"], r.per_chunk_us()),
            ],
            [
                r.label,
                "idle pod ≤ LangGraph pg's (cores; xact/s)",
                f"{r.idle_cpu:.3f} vs {_f(lg_idle_cpu, 3)}; "
                f"{_f(r.idle_xact_s, 2)} vs {_f(lg_idle_x, 2)}",
                yes(
                    r.idle_cpu <= lg_idle_cpu and r.idle_xact_s <= lg_idle_x,
                    lg_idle_cpu,
                    lg_idle_x,
                ),
            ],
            [
                r.label,
                f"server + broker + PostgreSQL ≤ {t['all_three_ratio']}x LangGraph pg's",
                f"{_f(three)} vs {_f(lg_three)} ms: {_f(three / lg_three, 2)}x",
                yes(three <= t["all_three_ratio"] * lg_three, three, lg_three),
            ],
        ]
    return table(["pod", "target (issue 29)", "measured", "met?"], rows)


def report(
    results: Sequence[VariantResult],
    args: argparse.Namespace,
    info: dict[str, str],
    notes: Sequence[str],
    load: tuple[str, str],
) -> str:
    cmd = "python -m bench.round3" + (" --quick" if args.quick else "")
    cmd += f" --processes {args.processes}" + (f" --base {args.base}" if args.base else "")
    cmd += "" if args.langgraph else " --no-langgraph"
    parts = [
        "## Round 3: side by side",
        f"`{cmd}` — {info['date']}; {info['nproc']} cores ({info['cpu']}); load average "
        f"before {load[0]}, after {load[1]} (each phase's 1-minute load is in its table: a "
        "busy machine moves the latencies, not the CPU-time and transaction figures).",
        summary_table(results),
        targets_table(results),
        "First chunk: POST written → first chunk read by a client that attaches as the POST "
        f"returns; {CHUNKS}-chunk replies, mock delay 0; N threads post at once, round after "
        "round (ttfc's method). 'server CPU' is the server's whole process tree (each process "
        "of a pod of several), less its idle rate.",
        ttfc_report.ttfc_table(results),
        "CPU per run: the server, its broker (nats-server / Redis) and PostgreSQL, each less "
        "its idle rate; sequential = one conversation, one run at a time.",
        ttfc_report.cpu_table(results),
        "Idle (all servers in one window):",
        ttfc_report.idle_table(results),
        f"Streaming: {args.chats} chats at once, {args.chunks} chunks each, {args.delay_ms:.0f} "
        "ms apart (the mock's pace), one client attached to each; server CPU over the phase, "
        "less its idle rate, per chunk (LangGraph pg runs 10 at a time, its default: its phase "
        "lasts longer, its CPU is counted all the same).",
        table(
            ["server", "chats", "seconds", "server CPU (cores)", "µs per chunk", "load"],
            [
                [
                    r.label,
                    r.stream.level if r.stream else "—",
                    _f(r.stream.seconds) if r.stream else "—",
                    _f(r.stream.cpu_s / r.stream.seconds, 2) if r.stream else "—",
                    _f(r.per_chunk_us(), 0),
                    r.stream.load if r.stream else "—",
                ]
                for r in results
            ],
        ),
        "Transactions: committed per sequential run (xact_commit after a settle, net of "
        "idle) and under the 10-thread bursts:",
        table(
            ["server", "sequential: xact per run", "sequential: write xacts per run"],
            [[r.label, _f(r.seq_xact_per_run), _f(r.seq_writes_per_run)] for r in results],
        ),
        ttfc_report.cost_table(results),
    ]
    spans = ttfc_report.breakdown_table(results)
    if spans:
        parts += ["Where a run's first chunk goes, threadgate pods (medians):", spans]
    parts += list(notes)
    return "\n\n".join(p for p in parts if p)


async def main(args: argparse.Namespace) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    info = machine()
    load0 = loadavg()
    notes: list[str] = []
    with Stack() as stack:
        # Every pod on the product's defaults (polling_s None), not the benches' fast poll.
        rigs: list[Rig] = [PodRig(stack, "this tree, 1 process", polling_s=None, log_dir=log_dir)]
        if args.processes > 1:
            env = {"THREADGATE_PROCESSES": str(args.processes)}
            label = f"this tree, {args.processes} processes"
            rigs.append(PodRig(stack, label, polling_s=None, log_dir=log_dir, extra_env=env))
        if args.base:
            sha, tree = tree_at(args.base)
            base = PodRig(stack, f"base {sha}", polling_s=None, log_dir=log_dir, tree=tree)
            rigs.insert(0, base)
        if args.langgraph:
            from bench.peers_langgraph_pg import langgraph_rigs

            got, note = await langgraph_rigs(stack, log_dir, ["join", "stream"])
            rigs += got
            notes.append(note)
        rounds = {1: 10, 10: 3} if args.quick else {1: 20, 10: 10}
        results = await measure(
            rigs,
            rounds=rounds,
            idle_window=10.0 if args.quick else 30.0,
            cpu_runs=10 if args.quick else 30,
            chats=args.chats,
            chunks=args.chunks,
            delay_ms=args.delay_ms,
        )
        with psycopg.connect(stack.admin_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            notes.append(f"PostgreSQL {row[0] if row else '?'} (the bench's own, shared).")
    say(f"logs in {log_dir}")
    notes.append(f"Packages: {info['packages']}.")
    return report(results, args, info, notes, (load0, loadavg()))


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and runs (minutes)")
    ap.add_argument("--processes", type=int, default=2, help="the multi-process pod's N")
    ap.add_argument("--base", metavar="REV", help="a pod of git revision REV too")
    ap.add_argument("--no-langgraph", dest="langgraph", action="store_false")
    ap.add_argument("--chats", type=int, default=40, help="streaming phase: chats at once")
    ap.add_argument("--chunks", type=int, default=400, help="streaming phase: chunks per chat")
    ap.add_argument("--delay-ms", type=float, default=25.0, help="streaming phase: pace")
    args = ap.parse_args()
    print(run_async(lambda: main(args)))


if __name__ == "__main__":
    cli()
