"""A bench-only pod that counts DBOS system-database calls: how many per run, and their CPU.

`python -m bench.count_pod` is `serve` of the threadgate package (or, with BENCH_APP=app, of a
`--base` revision's unpacked `app/`) with every method of DBOS's SystemDatabase wrapped: calls
and CPU time of the calling thread (`time.thread_time`, inclusive of nested wrapped calls).
threadgate's event-driven claim (`claim_and_start`) is counted too where the tree has it, and
BENCH_START_PATH applies a prototype of bench/proto_pod.py first. At
exit the counts go to BENCH_COUNT_OUT as JSON. Nothing in app/ changes.
"""

from __future__ import annotations

import atexit
import collections
import functools
import importlib
import json
import os
import threading
import time
import types
from typing import Any

CALLS: collections.Counter[str] = collections.Counter()
CPU: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def _wrap(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.thread_time() - t0
            with _lock:
                CALLS[name] += 1
                CPU[name] += spent

    return wrapper


def install(app: str) -> None:
    from dbos import _sys_db

    classes = [_sys_db.SystemDatabase]
    try:
        from dbos._sys_db_postgres import PostgresSystemDatabase

        classes.append(PostgresSystemDatabase)
    except ImportError:
        pass
    for cls in classes:
        for attr, value in list(vars(cls).items()):
            if isinstance(value, types.FunctionType) and not attr.startswith("__"):
                setattr(cls, attr, _wrap(f"{cls.__name__}.{attr}", value))
    try:
        runner = importlib.import_module(f"{app}.workflows.runner")
    except ImportError:
        return
    if hasattr(runner, "claim_and_start"):
        runner.claim_and_start = _wrap("claim_and_start", runner.claim_and_start)


def dump() -> None:
    out = os.environ.get("BENCH_COUNT_OUT")
    if out:
        with open(out, "w") as f:
            json.dump({k: {"calls": CALLS[k], "cpu_s": CPU[k]} for k in CALLS}, f)


def main() -> None:
    app = os.environ.get("BENCH_APP", "threadgate")
    path = os.environ.get("BENCH_START_PATH")
    if path:  # a prototype of bench/proto_pod.py, counted
        from bench.proto_pod import INSTALL

        INSTALL[path]()
    install(app)
    atexit.register(dump)
    importlib.import_module(f"{app}.cli").main(["serve"])


if __name__ == "__main__":
    main()
