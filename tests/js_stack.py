"""A stack of real pods for tests written in another language: `python -m tests.js_stack`.

Starts PostgreSQL, nats-server and N `threadgate serve` pods (threadgate.devstack and
tests/multipod/cluster.py, as the multipod suite does), prints one JSON line on stdout once
every pod is ready — `{"pods": [{"name", "url"}], "urls": [...]}` — then obeys JSON commands on
stdin, one per line, answering each with one JSON line `{"id", "ok", ...}`:

    {"id": 1, "op": "kill", "pod": "threadgate-1"}     SIGKILL, returns once it is gone
    {"id": 2, "op": "restart", "pod": "threadgate-1"}  same name and port, returns once ready
    {"id": 3, "op": "logs"}                            tails of every pod's log
    {"id": 4, "op": "stop"}                            or end of stdin: everything stops

`--pods N` (2), `--knob key=value` (THREADGATE_<KEY> for every pod, repeatable).

Also a reply source for plug-in tests, `THREADGATE_MODEL=tests.js_stack:demo_source`: text
and data events, chunk i of attempt a reads `chunk-{i}.{a} ` like the mock's `vary`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
from threadgate.devstack import NatsServer, Postgres, make_state_dir

from tests.multipod.cluster import Cluster, pod_env, unique_names

# Servers to use instead of starting them: PostgreSQL's URL (of its `postgres` database) and
# the template database to copy, nats-server's URL.
SHARED_PG, SHARED_TEMPLATE, SHARED_NATS = (
    "THREADGATE_JS_STACK_PG",
    "THREADGATE_JS_STACK_TEMPLATE",
    "THREADGATE_JS_STACK_NATS",
)


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _serve(pods: int, knobs: dict[str, str]) -> None:
    root = make_state_dir(Path(tempfile.mkdtemp(prefix="threadgate-js-", dir="/tmp")))
    # Under pytest (tests/multipod/test_js_client.py), the session's servers: a database of
    # its own (a copy of the migrated template) and a stream of its own on them.
    shared_pg, shared_nats = os.environ.get(SHARED_PG), os.environ.get(SHARED_NATS)
    pg = None if shared_pg else Postgres(root / "pg", fast=True)
    nats = None if shared_nats else NatsServer(root / "nats")
    cluster: Cluster | None = None
    try:
        if pg is not None:
            await asyncio.to_thread(pg.start)
        if nats is not None:
            await asyncio.to_thread(nats.start)
        server_url = shared_pg or pg.url("postgres")  # type: ignore[union-attr]
        name = f"js_{uuid.uuid4().hex[:10]}"
        template = f' TEMPLATE "{os.environ[SHARED_TEMPLATE]}"' if shared_pg else ""
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{template}'.encode())
        database_url = server_url.rsplit("/", 1)[0] + f"/{name}"
        stream, prefix = unique_names()
        env = pod_env(
            database_url=database_url,
            nats_url=shared_nats or nats.url,  # type: ignore[union-attr]
            stream=stream,
            prefix=prefix,
            **knobs,
        )
        logs = root / "pods"
        logs.mkdir()
        cluster = Cluster(env, logs, pods)
        await cluster.start()
        _say({"pods": [{"name": p.name, "url": p.url} for p in cluster.pods], "urls": cluster.urls})
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return
            if not line.strip():
                continue
            cmd = json.loads(line)
            try:
                result = await _obey(cluster, cmd)
                _say({"id": cmd.get("id"), "ok": True, **result})
            except Exception as exc:
                _say({"id": cmd.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            if cmd.get("op") == "stop":
                return
    finally:
        if cluster is not None:
            await cluster.stop()
        if nats is not None:
            nats.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _obey(cluster: Cluster, cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd.get("op")
    if op == "kill":
        return {"returncode": await cluster.pod(cmd["pod"]).kill()}
    if op == "restart":
        await cluster.pod(cmd["pod"]).restart()
        return {}
    if op == "logs":
        return {"logs": cluster.logs(int(cmd.get("lines", 40)))}
    if op == "stop":
        return {}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.js_stack", description=__doc__)
    parser.add_argument("--pods", type=int, default=2)
    parser.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    knobs = dict(k.split("=", 1) for k in args.knob)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.pods, knobs))


# ---- a plug-in reply source with data events ------------------------------------------------


class DemoSource:
    """Text with data events between: `chunks` parts (model_options, default 6), every third
    one a `data` event `step` {"i", "attempt"}; one part every `delay_ms` (default 30)."""

    reads_history = False

    async def stream(self, prompt: Any) -> AsyncIterator[Any]:
        from threadgate.sources import Data

        opts = prompt.options
        chunks = int(opts.get("chunks", 6))
        delay = float(opts.get("delay_ms", 30)) / 1000
        for i in range(chunks):
            if delay:
                await asyncio.sleep(delay)  # the source's pacing, like a model's
            if i % 3 == 1:
                yield Data("step", {"i": i, "attempt": prompt.attempt})
            else:
                yield f"chunk-{i}.{prompt.attempt} "


def demo_source(settings: Any) -> DemoSource:
    return DemoSource()


if __name__ == "__main__":
    main()
