"""PostgreSQL cost of a run: transactions for a 10-chunk and a 2,000-chunk run must be equal.

Chunks go to JetStream, never to PostgreSQL, so a run's transactions should not depend on its
length. Each case runs alone in a fixed window of W seconds on an otherwise idle pod (one
client attached), and the window's `pg_stat_database.xact_commit` delta of the threadgate
database is taken net of an idle window of the same length, measured in between. The
counters are read W - (run time) >= 11 s after the run, when every backend has flushed its
statistics. Write transactions (transaction ids consumed) are counted exactly alongside.

The pod polls its queue every 1 s here (the product's default is 0.05 s) so that idle polling,
which is subtracted, stays small against a run's own transactions.

    python -m bench.dbcost [--repeats 3] [--window 13]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path

from bench.harness import PgCounters, Proc, Stack, pod, pod_env, run_async, say, table
from bench.sse import HttpConn, attach

CASES = [
    ("idle", 0, 0.0),
    ("10 chunks, delay 0", 10, 0.0),
    ("2,000 chunks, delay 0", 2000, 0.0),
]


async def one_run(p: Proc, chunks: int, delay_ms: float) -> float:
    thread = f"cost-{uuid.uuid4().hex[:8]}"
    conn = await HttpConn.open(p.port)
    t0 = time.monotonic()
    body = {"input": "cost", "model_options": {"chunks": chunks, "delay_ms": delay_ms}}
    resp = await conn.request("POST", f"/threads/{thread}/runs", body)
    conn.close()
    assert resp.status == 202, resp.body
    stream, sconn = await attach(p.port, f"/threads/{thread}/attach", keep=False)
    assert stream.finished is not None
    await asyncio.wait_for(stream.finished, 120)
    sconn.close()
    return time.monotonic() - t0


async def window(
    p: Proc, pc: PgCounters, w: float, chunks: int, delay_ms: float
) -> tuple[int, int]:
    """(xact_commit delta, xids consumed) over a window of `w` seconds holding one run."""
    x0, i0 = pc.read()
    t0 = time.monotonic()
    if chunks:
        took = await one_run(p, chunks, delay_ms)
        if w - took < PgCounters.SETTLE_S:
            say(f"warning: run took {took:.1f}s, the settle is shorter than 11 s")
    await asyncio.sleep(max(0.0, t0 + w - time.monotonic()))
    x1, i1 = pc.read()
    return x1 - x0, i1 - i0


async def main(repeats: int, w: float) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    got: dict[str, list[tuple[int, int]]] = {name: [] for name, _, _ in CASES}
    with Stack() as stack:
        name = f"cost_{uuid.uuid4().hex[:6]}"
        url = stack.new_database(name)
        p = pod("cost-0", pod_env(url, stack.nats.url, polling_s=1.0), log_dir)
        await p.start()
        pc = PgCounters(stack.admin_url, name)
        try:
            await one_run(p, 5, 0)  # warm
            await asyncio.sleep(PgCounters.SETTLE_S)
            for r in range(repeats):
                for case, chunks, delay in CASES:
                    got[case].append(await window(p, pc, w, chunks, delay))
                    say(f"repeat {r + 1} {case}: {got[case][-1]}")
        finally:
            pc.close()
            await p.stop()
    idle_x = statistics.median(x for x, _ in got["idle"])
    idle_i = statistics.median(i for _, i in got["idle"])
    rows = []
    net: dict[str, float] = {}
    for case, _, _ in CASES:
        xs = [x for x, _ in got[case]]
        ids = [i for _, i in got[case]]
        net[case] = statistics.median(xs) - idle_x
        rows.append(
            [
                case,
                " / ".join(str(x) for x in xs),
                f"{net[case]:.0f}" if case != "idle" else "—",
                " / ".join(str(i) for i in ids),
                f"{statistics.median(ids) - idle_i:.0f}" if case != "idle" else "—",
            ]
        )
    short, long = net["10 chunks, delay 0"], net["2,000 chunks, delay 0"]
    verdict = (
        f"2,000 chunks cost {long - short:+.0f} transactions against 10 chunks "
        f"({long:.0f} vs {short:.0f}): "
        + ("equal up to a small constant." if abs(long - short) <= 10 else "NOT equal.")
    )
    return "\n\n".join(
        [
            "## PostgreSQL cost per run",
            f"Windows of {w:.0f} s, each holding one run (or none), one client attached; "
            "xact_commit of the pod's database; idle window median subtracted; queue polling "
            f"1 s; {repeats} repeats (values listed per repeat).",
            table(
                [
                    "case",
                    "xact_commit per window",
                    "net of idle (median)",
                    "write xacts per window",
                    "net writes (median)",
                ],
                rows,
            ),
            verdict,
        ]
    )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=float, default=13.0)
    args = ap.parse_args()
    print(run_async(lambda: main(args.repeats, args.window)))


if __name__ == "__main__":
    cli()
