"""Where a pod's CPU goes under a bench workload: py-spy samples of the pod process, summed.

py-spy must be installed in the venv that runs this (`pip install py-spy`; a profiler, not a
dependency of threadgate). Prints the top functions by own time and by inclusive time, with
file paths shortened to the package.

    python -m bench.profile [--workload ttfc10|stream] [--seconds 20] [--path queue]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from bench.harness import (
    REPO,
    SERVE,
    Proc,
    Stack,
    loadavg,
    pod,
    pod_env,
    run_async,
    say,
    table,
    tree_at,
)
from bench.rigs import run_phase

PROTO = [sys.executable, "-m", "bench.proto_pod"]
COUNT = [sys.executable, "-m", "bench.count_pod"]


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed in this venv: pip install py-spy")
    return found


async def record(
    pid: int, seconds: float, out: Path, rate: int = 100, gil: bool = True
) -> asyncio.subprocess.Process:
    """py-spy sampling a process (GIL holders only, or every running thread) for `seconds`,
    raw stacks into `out`."""
    return await asyncio.create_subprocess_exec(
        py_spy(),
        *("record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate)),
        *("--format", "raw", *(["--gil"] if gil else []), "--output", str(out)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


_TREE = re.compile(r"^.*/threadgate-tree-[0-9a-f]+/")  # a --base revision's unpacked app/


def short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = _TREE.sub("", m["file"])
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


# What a sample was doing: the first rule that matches its stack names it. A rule is (name,
# where: "thread" = a thread other than the event loop's (DBOS's to_thread calls and its own
# threads), "loop" = the event loop's, "" = either; any of these frames; and all of those).
Rule = tuple[str, str, tuple[str, ...], tuple[str, ...]]
COMPONENTS: list[Rule] = [
    ("DBOS claim + dispatch, event-driven (claim_and_start)", "thread", ("claim_and_start (",), ()),
    ("DBOS queue worker poll (claim + dispatch)", "thread", ("queue_worker_thread (",), ()),
    ("DBOS enqueue: workflow row (init_workflow)", "thread", ("_init_workflow (",), ()),
    (
        "DBOS step checkpoints (check + record)",
        "thread",
        ("check_existing_result", "record_step_result", "check_operation_execution"),
        (),
    ),
    ("DBOS workflow outcome", "thread", ("update_workflow_outcome", "persist ("), ()),
    ("DBOS background threads (scheduler, notifier, ...)", "thread", ("dbos/",), ()),
    ("other threads", "thread", ("(",), ()),
    ("POST: DBOS enqueue (loop side)", "loop", ("enqueue_workflow_async (",), ()),
    ("POST: our rows (thread lock, checks, insert)", "loop", ("PgRunStore.",), ("create_run (",)),
    ("POST: accept (validation, digest, limits)", "loop", ("create_run (",), ()),
    ("attach: our rows (latest run)", "loop", ("PgRunStore.",), ("app/api/attach.py",)),
    (
        "attach: endpoint, SSE relay and writes",
        "loop",
        ("app/api/attach.py", "relay (app/", "StreamingResponse", "SseResponse"),
        (),
    ),
    (
        "HTTP: uvicorn, middleware, routing (both requests)",
        "loop",
        ("run_asgi (", "app/server.py"),
        (),
    ),
    (
        "run: our rows (begin_attempt, finish)",
        "loop",
        ("PgRunStore.",),
        ("_execute_workflow_async (",),
    ),
    (
        "run: JetStream (purge, publish, flush)",
        "loop",
        ("JetStreamPublisher.", "JetStreamBuffer.", "app/streams/publisher.py"),
        ("_execute_workflow_async (",),
    ),
    (
        "run: DBOS workflow/step bookkeeping on the loop, the model",
        "loop",
        ("_execute_workflow_async (",),
        (),
    ),
    ("JetStream: publish acks", "loop", ("Acks.", "_handle_async_reply"), ()),
    ("attach: tail (events in from JetStream)", "loop", ("app/streams/tail.py",), ()),
    ("NATS: socket writes (flusher)", "loop", ("Client._flusher (",), ()),
    (
        "NATS: reads, parsing, dispatch",
        "loop",
        ("Client._read_loop (", "Subscription._wait_for_msgs ("),
        (),
    ),
    ("psycopg: waits and wake-ups on the loop", "loop", ("psycopg/",), ()),
    (
        "thread hops (to_thread, futures across threads)",
        "loop",
        ("_chain_future", "run_coroutine_threadsafe", "to_thread (", "Runner._sweep"),
        (),
    ),
    (
        "event loop itself (uvloop: I/O polling, callbacks)",
        "loop",
        ("Runner.run (asyncio/runners.py)",),
        (),
    ),
]


def component(frames: list[str]) -> str:
    joined = ";".join(frames)
    threaded = "Thread._bootstrap" in joined
    for name, where, markers, required in COMPONENTS:
        if (where == "thread" and not threaded) or (where == "loop" and threaded):
            continue
        if any(m in joined for m in markers) and all(r in joined for r in required):
            # The loop's own frames are on every loop stack: only its own samples are its.
            if name.startswith("event loop itself") and not frames[-1].startswith("Runner.run"):
                continue
            return name
    return "event loop, other"


def summarize(raw: Path, top: int = 20, per_run_ms: float | None = None) -> tuple[str, str, int]:
    """Tables by component and by function (own time); with `per_run_ms` (the pod's CPU per
    run while profiled) each share is also given as milliseconds of CPU per run."""
    own: collections.Counter[str] = collections.Counter()
    comp: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        # py-spy puts the thread first ("process ... thread ..."): skip non-frames.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        comp[component(frames)] += n

    def rows(c: collections.Counter[str], n: int) -> list[list[object]]:
        out: list[list[object]] = []
        for k, v in c.most_common(n):
            row: list[object] = [k if c is comp else f"`{k}`", f"{v / total * 100:.1f} %"]
            if per_run_ms is not None:
                row.append(f"{v / total * per_run_ms:.2f}")
            out.append(row)
        return out

    extra = ["ms per run"] if per_run_ms is not None else []
    return (
        table(["what the pod was doing", "share of samples", *extra], rows(comp, len(comp))),
        table(["function (own time)", "share of samples", *extra], rows(own, top)),
        total,
    )


async def stream_workload(p: Proc, seconds: float) -> int:
    """Many long replies at once, one client each (the throughput bench's shape)."""
    from bench.throughput import run_e2e

    runs, t_end = 0, time.monotonic() + seconds
    while time.monotonic() < t_end:
        await run_e2e(p, threads=50, chunks=400)
        runs += 50
    return runs


async def ttfc_workload(p: Proc, seconds: float) -> int:
    runs, t_end = 0, time.monotonic() + seconds
    while time.monotonic() < t_end:
        runs += (await run_phase(p, 10, 3, "prof")).runs
    return runs


async def runs1_workload(p: Proc, seconds: float) -> int:
    """One conversation, one run at a time (POST, attach, 5 chunks, done), a pause of 0-100 ms
    between runs as in ttfc's 1-thread phase: what one run costs end to end."""
    runs, t_end = 0, time.monotonic() + seconds
    while time.monotonic() < t_end:
        runs += (await run_phase(p, 1, 9, "prof")).runs
    return runs


WORKLOADS = {"ttfc10": ttfc_workload, "stream": stream_workload, "runs1": runs1_workload}


async def main(args: argparse.Namespace) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    raw = log_dir / "pyspy.raw"
    polling = None if args.polling == "default" else float(args.polling)
    with Stack() as stack:
        url = stack.new_database(f"prof_{uuid.uuid4().hex[:6]}")
        env = pod_env(url, stack.nats.url, polling_s=polling, delay_ms=0)
        what, tree = "this tree", None
        cmd = COUNT if args.count else SERVE
        if args.base:  # a stock pod of that revision
            sha, tree = tree_at(args.base)
            what = f"base {sha}"
            env["BENCH_APP"] = "app"  # for count_pod: the unpacked tree's package
        elif args.path:  # a bench prototype of a start path
            env["BENCH_START_PATH"] = args.path
            cmd = COUNT if args.count else PROTO
            what = f"proto_pod, start path {args.path}"
        counts = log_dir / "counts.json"
        env["BENCH_COUNT_OUT"] = str(counts)
        p = pod("prof-0", env, log_dir, cmd, tree=tree)
        if tree is not None and args.count:
            p.env["PYTHONPATH"] = f"{tree}:{REPO}"  # the tree's app, and bench.count_pod
        await p.start()
        work = WORKLOADS[args.workload]
        warm = await work(p, 2.0)
        await asyncio.sleep(1.0)
        spy = None if args.count else await record(p.pid, args.seconds, raw, args.rate, args.gil)
        cpu0, load = p.cpu_s(), loadavg()
        runs = await work(p, args.seconds)
        cpu = p.cpu_s() - cpu0
        if spy is not None:
            await asyncio.wait_for(spy.wait(), 60)
        await p.stop()
    poll = "defaults" if polling is None else f"poll={polling}"
    title = (
        f"### Pod {'DBOS calls' if args.count else 'profile'}: {args.workload}, {what}, {poll}, "
        f"{args.seconds:.0f} s, load {load} ({runs} runs, pod CPU {cpu / runs * 1000:.1f} ms per run"
    )
    if args.count:
        per = f", counting; calls over the pod's life / its {warm + runs} runs)"
        return "\n\n".join([title + per, count_table(counts, warm + runs)])
    comp, own, total = summarize(raw, args.top, cpu / runs * 1000)
    say(f"raw samples in {raw}")
    gil = ", GIL holders" if args.gil else ""
    return "\n\n".join(
        [title + f" while profiled; {total} samples at {args.rate} Hz{gil})", comp, own]
    )


def count_table(path: Path, runs: int) -> str:
    """DBOS SystemDatabase calls per run and their CPU (the calling thread's, inclusive)."""
    if not path.exists():
        return "(no counts written: the pod did not exit cleanly)"
    data = json.loads(path.read_text())
    rows = [
        [
            f"`{name}`",
            f"{v['calls'] / runs:.2f}",
            f"{v['cpu_s'] / runs * 1000:.2f}",
            f"{v['cpu_s'] / v['calls'] * 1000:.2f}",
        ]
        for name, v in sorted(data.items(), key=lambda kv: -kv[1]["cpu_s"])
    ]
    return table(["call", "calls per run", "CPU ms per run", "CPU ms per call"], rows)


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="ttfc10", choices=sorted(WORKLOADS))
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--path", help="profile bench/proto_pod.py with this start path")
    ap.add_argument("--base", metavar="REV", help="profile a stock pod of git revision REV")
    ap.add_argument("--polling", default="0.05", help="seconds, or 'default' (unset)")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--no-gil", dest="gil", action="store_false", help="every running thread")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--count", action="store_true", help="count DBOS calls (bench/count_pod.py)")
    args = ap.parse_args()
    print(run_async(lambda: main(args)))


if __name__ == "__main__":
    cli()
