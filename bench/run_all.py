"""Run every bench and write their tables into docs/benchmarks.md with the command and machine.

Each bench runs as its own process (`python -m bench.<name>`), prints its markdown on stdout
and its progress on stderr (kept in a log under /tmp). The generated part of
docs/benchmarks.md sits between two markers; text outside them is kept as it is.

    python -m bench.run_all [--only ttfc,throughput] [--quiet-wait 300] [--out docs/benchmarks.md]
                            [--base REV]

`--base REV`: before/after in the same run — throughput and fanout also run a pod of git
revision REV (see bench.harness.tree_at), and one more ttfc puts REV's pod, this tree's and
this tree's with fast start side by side, phase by phase.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.harness import REPO, cpu_busy, machine, say, table, wait_quiet

BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"

# (name, extra args, time limit in seconds)
BENCHES: list[tuple[str, list[str], int]] = [
    ("round3", [], 1500),  # the side-by-side report of issue 29 (LangGraph pg included)
    ("ttfc", [], 240),
    ("ttfc_paths", [], 240),
    ("throughput", ["--repeats", "3"], 240),
    ("fanout", ["--profile"], 300),
    ("dbcost", [], 180),
    ("footprint", [], 120),
    ("peers", [], 300),
    ("recovery", [], 240),  # written by another engineer; run when it exists
    ("profile", ["--workload", "ttfc10", "--seconds", "10", "--top", "12"], 120),
    ("profile", ["--workload", "stream", "--seconds", "10", "--top", "12"], 120),
]


def run_one(name: str, args: list[str], limit: int, log_dir: Path) -> tuple[str, list[object]]:
    cmd = [sys.executable, "-m", f"bench.{name}", *args]
    shown = " ".join(["python", "-m", f"bench.{name}", *map(shlex.quote, args)])
    log = log_dir / f"{name}-{uuid.uuid4().hex[:4]}.log"
    busy = cpu_busy(2.0)
    say(f"== {shown} (limit {limit}s; machine {busy * 100:.0f} % busy; log {log})")
    t0 = time.monotonic()
    with open(log, "wb") as err:
        try:
            out = subprocess.run(
                cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, timeout=limit, check=False
            )
            code: int | str = out.returncode
            text = out.stdout.decode(errors="replace").strip()
        except subprocess.TimeoutExpired as exc:
            code, text = "timeout", (exc.stdout or b"").decode(errors="replace").strip()
    took = time.monotonic() - t0
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        text = (text + "\n\n" if text else "") + (
            f"**`{shown}` did not complete ({code}).** Last lines of its log:\n\n```\n{tail}\n```"
        )
    say(f"   {name}: {code} in {took:.0f}s")
    summary = [f"`{shown}`", f"{took:.0f} s", code, f"{busy * 100:.0f} %"]
    return f"{text}\n\n_Command: `{shown}` — {took:.0f} s._", summary


def with_base(rev: str) -> list[tuple[str, list[str], int]]:
    """The bench list with before/after runs against revision `rev`."""
    out: list[tuple[str, list[str], int]] = []
    for name, extra, limit in BENCHES:
        if name in ("throughput", "fanout"):
            out.append((name, [*extra, "--base", rev], limit * 2))
            continue
        out.append((name, extra, limit))
        if name == "ttfc":
            side = ["--polling", "0.05", "--base", rev, "--fast-start"]
            out.append((name, side, 420))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated bench names")
    ap.add_argument("--quiet-wait", type=float, default=0.0, help="seconds to wait for quiet")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--base", metavar="REV", help="before/after against git revision REV")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    log_dir = Path("/tmp") / f"threadgate-run-all-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir()
    busy = wait_quiet(args.quiet_wait) if args.quiet_wait else cpu_busy()
    info = machine()
    t0 = time.monotonic()
    sections, summary = [], []
    for name, extra, limit in with_base(args.base) if args.base else BENCHES:
        if only and name not in only:
            continue
        if not (REPO / "bench" / f"{name}.py").exists():
            say(f"== bench/{name}.py does not exist (yet): skipped")
            summary.append([f"`python -m bench.{name}`", "—", "absent", "—"])
            continue
        text, row = run_one(name, extra, limit, log_dir)
        sections.append(text)
        summary.append(row)
    total = time.monotonic() - t0
    command = "python -m bench.run_all" + (f" --only {args.only}" if args.only else "")
    command += f" --base {args.base}" if args.base else ""
    generated = "\n\n".join(
        [
            BEGIN,
            "## The run",
            f"`{command}` (from the repository root, in its virtualenv) — {total / 60:.1f} min, "
            f"finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Bench logs: "
            f"`{log_dir}`.",
            table(
                ["machine", ""],
                [[k, v] for k, v in info.items()]
                + [["CPU busy before the run (all processes)", f"{busy * 100:.0f} %"]],
            ),
            "Each bench, in order (the busy share is of the whole machine, sampled for 2 s "
            "just before the bench started: other work on the machine shows up there):",
            table(["command", "took", "exit", "machine busy before"], summary),
            *sections,
            END,
        ]
    )
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + generated + old[old.index(END) + len(END) :]
    else:
        new = (old.rstrip() + "\n\n" if old else "# Benchmarks\n\n") + generated + "\n"
    out.write_text(new)
    say(f"wrote {out} ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
