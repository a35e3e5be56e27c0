"""`threadgate dev [kill | demo | clean]`: the embedded stack and what acts on it."""

from __future__ import annotations

import argparse
import signal
import subprocess
from pathlib import Path
from typing import Any

from .exits import OK, CliError


def dev(args: argparse.Namespace) -> int:
    from .. import devstate
    from ..devstate import DevError

    try:
        if args.action == "kill":
            state = devstate.find_state(args.state_dir)
            sig = signal.Signals[f"SIG{args.signal}"]
            killed = devstate.kill(state, args.name, sig)
            print(
                f"sent {sig.name} to {killed.name} (pid {killed.pid}) of the stack in {state};"
                " threadgate dev starts it again in 1s"
            )
            return OK
        if args.action == "demo":
            from .. import demo

            return demo.run(
                devstate.find_state(args.state_dir),
                chunks=args.chunks,
                delay_ms=args.delay_ms,
                kill_at=args.kill_at,
                thread=args.thread,
            )
        state = Path(args.state_dir or devstate.STATE_DIR)
        if args.action == "clean":
            removed = devstate.clean(state)
            if not removed:
                print(f"nothing to remove: {state} does not exist")
            for item in removed:
                print(f"removed {item}")
            return OK
        from ..supervisor import DevStack

        return DevStack(
            state,
            pods=args.pods,
            port=args.port,
            pg_port=args.pg_port,
            nats_port=args.nats_port,
            host=args.host,
        ).run()
    except DevError as exc:
        raise CliError(f"dev: {exc}", exc.status) from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise CliError(f"dev: {exc}{': ' + detail[-1] if detail else ''}") from None
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise CliError(f"dev: {exc}") from None


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    dev_ = sub.add_parser(
        "dev",
        help="embedded PostgreSQL + nats-server and N supervised pods",
        description="Start PostgreSQL, nats-server and N pods (threadgate-0..N-1); a pod that "
        "dies is started again under its name and port. Ctrl-C stops everything.",
    )
    dev_.add_argument("--pods", type=int, default=1, help="how many pods (default 1)")
    dev_.add_argument(
        "--port", type=int, default=8000, help="first pod's port, then +1 each (0: any free port)"
    )
    dev_.add_argument(
        "--host",
        default="127.0.0.1",
        help="the pods' address (default 127.0.0.1: this machine only; auth is off in dev). "
        "PostgreSQL and nats-server listen on 127.0.0.1 whatever it is",
    )
    dev_.add_argument(
        "--state-dir", default=None, help="data and logs (default .threadgate)", metavar="DIR"
    )
    dev_.add_argument("--pg-port", type=int, default=0, help="PostgreSQL's port (0: any free)")
    dev_.add_argument("--nats-port", type=int, default=0, help="nats-server's port (0: any free)")
    dev_.set_defaults(fn=dev, action=None)
    actions = dev_.add_subparsers(dest="action", metavar="{kill,demo,clean}")
    found = "the stack of --state-dir, else of the nearest .threadgate in this directory or above"
    kill = actions.add_parser(
        "kill",
        help="SIGKILL a pod of this stack (threadgate dev starts it again)",
        description=f"Signal the pod NAME of one stack: {found}; by the pid its supervisor "
        "recorded, checked against the process's start time. No other process is looked at.",
    )
    kill.add_argument("name", help="a pod name, e.g. threadgate-1 (`threadgate runs` shows it)")
    kill.add_argument("--signal", default="KILL", choices=["KILL", "TERM"], help="default KILL")
    kill.add_argument("--state-dir", default=argparse.SUPPRESS, metavar="DIR")
    demo = actions.add_parser(
        "demo",
        help="a pod dies mid-reply: watch the reply continue, exactly once",
        description="Post a long reply to a pod other than threadgate-0 (whose chat page to "
        "open is printed), SIGKILL the pod running it once it streams, and print what a "
        f"client saw beside the stored reply. Acts on {found}; needs 2 pods or more.",
    )
    demo.add_argument("--chunks", type=int, default=200, help="the reply's chunks (default 200)")
    demo.add_argument("--delay-ms", type=float, default=50, help="between chunks (default 50)")
    demo.add_argument(
        "--kill-at", type=int, default=40, help="kill after this many chunks (default 40)"
    )
    demo.add_argument("--thread", default=None, help="default: demo-<random>")
    demo.add_argument("--state-dir", default=argparse.SUPPRESS, metavar="DIR")
    clean = actions.add_parser(
        "clean",
        help="remove a stopped stack's state and data",
        description="Remove a stopped stack's state directory (default .threadgate) and its "
        "PostgreSQL data; says what it removed.",
    )
    clean.add_argument("--state-dir", default=argparse.SUPPRESS, metavar="DIR")
