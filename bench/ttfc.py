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
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench import ttfc_report
from bench.harness import Stack, loadavg, run_async, say, tree_at
from bench.rigs import LEVELS, PodRig, Rig, VariantResult, compare, idle_all

PROTO = [sys.executable, "-m", "bench.proto_pod"]


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


async def main(args: argparse.Namespace) -> str:
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
