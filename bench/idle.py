"""What an idle pod costs: CPU (cores) and PostgreSQL transactions per second.

One pod per configuration, each on a database of its own, nothing posted. After start-up
settles, a window of W seconds: the pod's CPU time delta and its database's committed
transactions (`pg_stat_database.xact_commit`, read PgCounters.SETTLE_S after the window so
every backend has flushed). A readiness probe every 5 s, as a kubelet would, is included.

    python -m bench.idle [--window 30] [--base REV] [--env K=V ...]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx

from bench.harness import (
    PgCounters,
    Stack,
    database_name,
    machine,
    pod,
    pod_env,
    run_async,
    say,
    table,
    tree_at,
)


async def measure(
    stack: Stack, name: str, env: dict[str, str], window: float, tree: Path | None
) -> list[object]:
    url = stack.new_database(f"idle_{name.replace('-', '_')}")
    full = pod_env(url, stack.nats.url)
    del full["THREADGATE_QUEUE_POLLING_S"]  # the product's default, not the benches' 0.05 s
    full.update(env)
    p = pod(name, full, stack.root, tree=tree)
    await p.start()
    counters = PgCounters(stack.admin_url, database_name(url))
    try:
        await asyncio.sleep(PgCounters.SETTLE_S)  # start-up's own transactions flush first
        x0, _ = counters.read()
        c0, t0 = p.cpu_s(), time.monotonic()
        async with httpx.AsyncClient(timeout=5) as http:
            while time.monotonic() - t0 < window:
                await http.get(f"{p.url}/readyz")  # the kubelet's probe
                await asyncio.sleep(5)  # the probe's period
        cpu = (p.cpu_s() - c0) / (time.monotonic() - t0)
        await asyncio.sleep(PgCounters.SETTLE_S)
        x1, _ = counters.read()
        # The settle's transactions are the same idle kind: divide by the whole span.
        xact = (x1 - x0) / (time.monotonic() - t0)
    finally:
        counters.close()
        await p.stop()
    return [name, f"{cpu:.3f}", f"{xact:.1f}"]


async def main(args: argparse.Namespace) -> None:
    configs: list[tuple[str, dict[str, str], Path | None]] = [("this tree", {}, None)]
    if args.base:
        sha, tree = tree_at(args.base)
        configs.append((f"base {sha}", {}, tree))
    for kv in args.env:
        configs.append((f"env {kv}", dict([kv.split("=", 1)]), None))
    rows = []
    with Stack() as stack:
        for i, (label, env, tree) in enumerate(configs):
            say(f"measuring {label} for {args.window:.0f}s ...")
            row = await measure(stack, f"idle-{i}", env, args.window, tree)
            rows.append([label, *row[1:]])
    print(f"Idle pod, {args.window:.0f} s window ({machine().get('cpu', '?')}):\n")
    print(table(["pod", "CPU (cores)", "committed xact/s"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--base", help="also measure a pod of this git revision")
    parser.add_argument("--env", action="append", default=[], help="also a pod with K=V")
    run_async(lambda: main(parser.parse_args()))
