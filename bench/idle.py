"""What an idle pod costs: CPU (cores) and PostgreSQL transactions per second.

One pod per configuration, each on a database of its own, warmed with two runs, then nothing
posted: all of them idle in the same window of W seconds (bench.rigs.idle_all: each pod's
process-tree CPU over the window, its database's committed transactions over the window and a
settle after it, a readiness probe to each every 5 s as a kubelet would).

    python -m bench.idle [--window 30] [--base REV] [--env K=V ...]
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from bench.harness import Stack, machine, run_async, table, tree_at
from bench.rigs import PodRig, idle_all


async def main(args: argparse.Namespace) -> None:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    rows = []
    with Stack() as stack:
        # polling_s None: the product's defaults, not the benches' fast queue poll.
        rigs = [PodRig(stack, "this tree", polling_s=None, log_dir=log_dir)]
        if args.base:
            sha, tree = tree_at(args.base)
            rigs.append(PodRig(stack, f"base {sha}", polling_s=None, log_dir=log_dir, tree=tree))
        for kv in args.env:
            k, v = kv.split("=", 1)
            env = {k: v}
            rigs.append(PodRig(stack, f"env {kv}", polling_s=None, log_dir=log_dir, extra_env=env))
        try:
            for rig in rigs:
                await rig.open()
            await idle_all(rigs, args.window)
            for rig in rigs:
                r = rig.result
                rows.append([rig.label, f"{r.idle_cpu:.3f}", f"{r.idle_xact_s:.1f}"])
        finally:
            for rig in rigs:
                await rig.close()
    print(f"Idle pod, {args.window:.0f} s window ({machine().get('cpu', '?')}):\n")
    print(table(["pod", "CPU (cores)", "committed xact/s"], rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--base", help="also measure a pod of this git revision")
    parser.add_argument("--env", action="append", default=[], help="also a pod with K=V")
    run_async(lambda: main(parser.parse_args()))
