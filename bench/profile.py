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
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from bench.harness import Proc, Stack, pod, pod_env, run_async, say, table
from bench.ttfc import run_phase

PROTO = [sys.executable, "-m", "bench.proto_pod"]


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed in this venv: pip install py-spy")
    return found


async def record(pid: int, seconds: float, out: Path) -> asyncio.subprocess.Process:
    """py-spy sampling a process (GIL holders only) for `seconds`, raw stacks into `out`."""
    return await asyncio.create_subprocess_exec(
        py_spy(),
        *("record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100"),
        *("--format", "raw", "--gil", "--output", str(out)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


# What a sample was doing: the first rule whose frame is in its stack names it.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("DBOS queue worker thread (polling, claiming)", ("queue_worker_thread (",)),
    ("DBOS system-database calls in threads (step checkpoints, rows)", ("dbos/",)),
    ("POST /runs: accept (lock, rows, enqueue)", ("create_run (app/api/runs.py)",)),
    ("attach: SSE relay and response writes", ("relay (app/", "StreamingResponse")),
    ("run: publish to JetStream", ("JetStreamPublisher.",)),
    ("run: run rows (begin_attempt, history, finish, stop poll)", ("PgRunStore.",)),
    ("run: other (DBOS workflow/step bookkeeping, model)", ("_execute_workflow_async (",)),
    ("NATS read loop (acks, deliveries, parsing)", ("Client._read_loop (",)),
    ("tails: events in from JetStream", ("app/streams/tail.py",)),
    ("NATS subscription dispatch", ("Subscription._wait_for_msgs (",)),
    ("NATS flusher (socket writes)", ("Client._flusher (",)),
    ("thread pool (DBOS to_thread calls)", ("_WorkItem.run (",)),
    ("HTTP framework (routing, validation), other endpoints", ("run_asgi (",)),
]


def component(frames: list[str]) -> str:
    joined = ";".join(frames)
    threaded = "Thread._bootstrap" in joined
    for name, markers in COMPONENTS:
        if name.startswith("DBOS system-database") and not threaded:
            continue
        if any(m in joined for m in markers):
            return name
    return "event loop, other"


def summarize(raw: Path, top: int = 20) -> tuple[str, str, int]:
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

    def rows(c: collections.Counter[str]) -> list[list[object]]:
        return [
            [k if c is comp else f"`{k}`", f"{v / total * 100:.1f} %"]
            for k, v in c.most_common(top)
        ]

    return (
        table(["what the pod was doing", "share of samples"], rows(comp)),
        table(["function (own time)", "share of samples"], rows(own)),
        total,
    )


async def stream_workload(p: Proc, seconds: float) -> None:
    """Many long replies at once, one client each (the throughput bench's shape)."""
    from bench.throughput import run_e2e

    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        await run_e2e(p, threads=50, chunks=400)


async def ttfc_workload(p: Proc, seconds: float) -> None:
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        await run_phase(p, 10, 3, "prof")


async def main(workload: str, seconds: float, path: str, top: int) -> str:
    log_dir = Path("/tmp") / f"threadgate-bench-logs-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    raw = log_dir / "pyspy.raw"
    with Stack() as stack:
        url = stack.new_database(f"prof_{uuid.uuid4().hex[:6]}")
        env = pod_env(url, stack.nats.url, polling_s=0.05, delay_ms=0)
        env["BENCH_START_PATH"] = path
        p = pod("prof-0", env, log_dir, PROTO)
        await p.start()
        work = ttfc_workload if workload == "ttfc10" else stream_workload
        await work(p, 2.0)  # warm
        spy = await record(p.pid, seconds, raw)
        await work(p, seconds)
        await asyncio.wait_for(spy.wait(), 60)
        await p.stop()
    comp, own, total = summarize(raw, top)
    say(f"raw samples in {raw}")
    return "\n\n".join(
        [
            f"### Pod profile: {workload}, {seconds:.0f} s, start path {path} ({total} samples)",
            comp,
            own,
        ]
    )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="ttfc10", choices=["ttfc10", "stream"])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--path", default="queue")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    print(run_async(lambda: main(args.workload, args.seconds, args.path, args.top)))


if __name__ == "__main__":
    cli()
