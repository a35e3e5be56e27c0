"""bench/ttfc.py's markdown: TTFC, CPU per run, idle cost, where the time goes, the targets."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

from bench.harness import PgCounters, ms, pct, table
from bench.rigs import CHUNKS, THINK_S, Phase, VariantResult


def _p(ph: Phase, q: float) -> float:
    return pct([s.ttfc for s in ph.samples], q)


def _f(x: float, digits: int = 1) -> str:
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def ttfc_table(results: Sequence[VariantResult]) -> str:
    rows = []
    for r in results:
        for level, ph in r.phases.items():
            rows.append(
                [
                    r.label,
                    level,
                    len(ph.samples),
                    ms(_p(ph, 50)),
                    ms(_p(ph, 99)),
                    ms(pct([s.post for s in ph.samples], 50)),
                    ms(pct([s.ttfc for s in ph.cold], 50)),
                    f"{ph.cpu_s / ph.seconds * 100:.0f} %",
                    _f(r.per_run_ms(ph)),
                    ph.load,
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
            "server CPU",
            "server CPU ms per run (net of idle)",
            "load (1 min) at start",
        ],
        rows,
    )


def cpu_table(results: Sequence[VariantResult]) -> str:
    rows = []
    for r in results:
        for name, ph in [("sequential", r.sequential), ("10 threads", r.phases.get(10))]:
            if ph is None:
                continue
            broker, pg = r.side_per_run_ms(ph)
            server = r.per_run_ms(ph)
            rows.append(
                [
                    r.label,
                    f"{name} ({ph.runs} runs)",
                    f"**{_f(server)}**",
                    _f(broker),
                    _f(pg),
                    _f(server + broker + pg),
                    ph.load,
                ]
            )
    return table(
        [
            "variant",
            "runs",
            "server ms/run",
            "broker ms/run (nats-server / Redis)",
            "PostgreSQL ms/run",
            "all three",
            "load (1 min) at start",
        ],
        rows,
    )


def idle_table(results: Sequence[VariantResult]) -> str:
    rows = [
        [
            r.label,
            f"{r.idle_cpu:.3f}",
            f"{r.idle_xact_s:.1f}",
            f"{r.idle_broker_cpu:.3f}",
            r.idle_load,
        ]
        for r in results
    ]
    return table(
        [
            "variant",
            "idle server CPU (cores)",
            "committed xact/s of its database",
            "its broker's CPU (cores; nats-server is shared by the pods)",
            "load (1 min), window start → end",
        ],
        rows,
    )


def breakdown_table(results: Sequence[VariantResult]) -> str:
    rows, legs = [], None
    for r in results:
        for level, ph in r.phases.items():
            if ph.breakdown:
                legs = legs or list(ph.breakdown)
                rows.append([r.label, level, *(ms(v) for v in ph.breakdown.values())])
    if legs is None:
        return ""
    return table(["variant", "threads", *(f"{k} ms" for k in legs)], rows)


def cost_table(results: Sequence[VariantResult]) -> str:
    rows = [
        [
            r.label,
            f"{r.load_xact_s:.0f}",
            f"{r.load_xact_per_run:.1f}",
            f"{r.load_writes_per_run:.1f}",
        ]
        for r in results
    ]
    return table(
        ["variant", "xact/s at 10 threads", "xact per run (net of idle)", "write xacts per run"],
        rows,
    )


def targets(results: Sequence[VariantResult]) -> str:
    """Issue 18's targets, for this tree's first pod against LangGraph pg's best shape."""
    ours = next((r for r in results if r.label.startswith("this tree")), None)
    peers = [r for r in results if r.system != "threadgate"]
    if ours is None or not peers or 1 not in ours.phases or 10 not in ours.phases:
        return ""
    one = {r.label: _p(r.phases[1], 50) for r in peers if 1 in r.phases}
    p50 = {r.label: _p(r.phases[10], 50) for r in peers if 10 in r.phases}
    p99 = {r.label: _p(r.phases[10], 99) for r in peers if 10 in r.phases}
    lg1, lg50, lg99 = min(one, key=one.__getitem__), min(p50, key=p50.__getitem__), None
    lg99 = min(p99, key=p99.__getitem__)
    t1, t50, t99 = _p(ours.phases[1], 50), _p(ours.phases[10], 50), _p(ours.phases[10], 99)
    cpu_ph = ours.sequential or ours.phases[1]
    cpu = ours.per_run_ms(cpu_ph)

    def yes(ok: bool) -> str:
        return "**yes**" if ok else "**no**"

    rows = [
        ["idle pod CPU ≤ 0.02 cores", f"{ours.idle_cpu:.3f}", yes(ours.idle_cpu <= 0.02)],
        ["idle pod ≤ 5 committed xact/s", f"{ours.idle_xact_s:.1f}", yes(ours.idle_xact_s <= 5)],
        [
            "TTFC p50 at 1 thread ≤ 0.6 x LangGraph pg's",
            f"{ms(t1)} ms vs {ms(one[lg1])} ms ({lg1}): {t1 / one[lg1]:.2f}x",
            yes(t1 <= 0.6 * one[lg1]),
        ],
        [
            "TTFC p50 at 10 threads ≤ LangGraph pg's",
            f"{ms(t50)} vs {ms(p50[lg50])} ms ({lg50}): {t50 / p50[lg50]:.2f}x",
            yes(t50 <= p50[lg50]),
        ],
        [
            "TTFC p99 at 10 threads ≤ LangGraph pg's",
            f"{ms(t99)} vs {ms(p99[lg99])} ms ({lg99}): {t99 / p99[lg99]:.2f}x",
            yes(t99 <= p99[lg99]),
        ],
        [
            f"pod CPU per run ({CHUNKS} chunks, one attach) ≤ 8 ms",
            f"{cpu:.1f} ms ({cpu_ph.runs} runs, "
            + ("sequential)" if ours.sequential else "1 thread)"),
            yes(cpu <= 8),
        ],
    ]
    return table([f"target (issue 18), {ours.label}", "measured", "met?"], rows)


def report(
    results: Sequence[VariantResult],
    *,
    side_by_side: bool,
    idle_window: float,
    notes: Sequence[str],
    load: tuple[str, str],
) -> str:
    at10 = {r.label: r.phases[10] for r in results if 10 in r.phases and r.system == "threadgate"}
    parts = [
        "## Time to first chunk, side by side"
        + (
            " (with LangGraph pg)"
            if any(r.system != "threadgate" for r in results)
            else " (before/after, fast start)"
        )
        if side_by_side
        else "## Time to first chunk (stock pod, per queue polling interval)",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; load average (1, 5, 15 min) "
        f"before {load[0]}, after {load[1]}.",
        "POST written → first chunk read by a client that attaches as soon as the POST's answer "
        f"is read. {CHUNKS}-chunk replies, mock delay 0; N threads post in the same instant, "
        "round after round (each thread a conversation; the first round, a new thread with a "
        "cold tail, is the 'first turn' column), with a random pause of "
        f"0-{THINK_S * 1000:.0f} ms before each burst (untimed; without it back-to-back turns "
        "lock onto a queue poll's phase). PostgreSQL with default durability (fsync on), "
        "client on the same 2 cores. 'server CPU ms per run' = the server process's CPU time "
        "over the phase, less its idle rate, / runs.",
        ttfc_table(results),
    ]
    if at10:
        best = min(at10, key=lambda k: _p(at10[k], 50))
        p50, p99 = _p(at10[best], 50), _p(at10[best], 99)
        parts.append(
            f"Long-run goal at 10 threads: p50 ≤ 25 ms and p99 ≤ 100 ms. Best pod here: {best}, "
            f"p50 {ms(p50)} ms, p99 {ms(p99)} ms — "
            + ("met." if p50 <= 0.025 and p99 <= 0.1 else "not met.")
        )
    goal = targets(results)
    if goal:
        parts.append(goal)
    if any(r.sequential for r in results) or side_by_side:
        parts += [
            "CPU per run: the server process, its broker and PostgreSQL (all databases: one "
            "server at a time runs), each less its rate while every server idled. 'sequential' "
            f"= one conversation, one run at a time, a pause of 0-{THINK_S * 1000:.0f} ms between "
            "runs; '10 threads' = the bursts above.",
            cpu_table(results),
        ]
    parts += [
        f"Idle: every server started and warmed, then {idle_window:.0f} s with nothing posted "
        "(all in the same window, a readiness probe to each every 5 s); committed transactions "
        f"of its own database over the window and a {PgCounters.SETTLE_S:.0f} s settle after it "
        "(pg_stat_database.xact_commit).",
        idle_table(results),
    ]
    spans = breakdown_table(results)
    if spans:
        parts += [
            "Where the time goes, threadgate pods (medians; wall clock of this host; `row` = "
            "the run row's insert, `enq` = DBOS workflow row created, `deq` = claimed, `step` "
            "= the reply step began):",
            spans,
        ]
    parts += [
        "PostgreSQL transactions under the 10-thread load (xact_commit deltas after a "
        f"{PgCounters.SETTLE_S:.0f} s settle; 'write xacts' = transaction ids consumed):",
        cost_table(results),
        *notes,
    ]
    return "\n\n".join(p for p in parts if p)
