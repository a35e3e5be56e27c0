"""Bytes per run in PostgreSQL: what a month of runs costs on disk, and what retention frees.

One pod on a database of its own, THREADGATE_MODEL=bench.text_source:make (a reply of a known
size that PostgreSQL's compression cannot shrink, like a model's prose). After a warm-up batch
(tables and indexes past their first pages, a VACUUM as autovacuum would do), N runs of a known
input and reply, 10 per thread: the growth of every table of the `dbos` and `threadgate`
schemas (`pg_total_relation_size`: heap, TOAST and indexes) divided by N, and the live tuples
(`pgstattuple` after a VACUUM: what stays once dead versions are reused). Then every run is
aged past THREADGATE_RETENTION_DAYS and one retention sweep deletes their workflows: what is
left per run is the conversation (the run's row and its two messages).

    python -m bench.storage [--runs 300] [--reply-bytes 3900] [--input-bytes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg

from bench.harness import Stack, machine, pod, pod_env, run_async, say, table

SIZES_SQL = """
SELECT n.nspname || '.' || c.relname AS name, pg_total_relation_size(c.oid) AS bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('dbos', 'threadgate') AND c.relkind = 'r'
"""
# Live tuple bytes of each table and its TOAST table (pgstattuple), after a VACUUM.
LIVE_SQL = """
SELECT n.nspname || '.' || c.relname AS name,
       (pgstattuple(c.oid)).tuple_len
       + coalesce((SELECT (pgstattuple(c.reltoastrelid)).tuple_len
                   WHERE c.reltoastrelid <> 0), 0) AS bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('dbos', 'threadgate') AND c.relkind = 'r'
"""
ACTIVE_SQL = "SELECT count(*) FROM dbos.workflow_status WHERE status IN ('PENDING', 'ENQUEUED')"


def read(url: str, sql: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {name: int(n) for name, n in conn.execute(sql).fetchall()}


def vacuum(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for (name,) in conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname IN ('dbos', 'threadgate') AND c.relkind = 'r'"
        ).fetchall():
            conn.execute(f"VACUUM {name}")


async def batch(url: str, tag: str, runs: int, reply_bytes: int, input_text: str) -> None:
    """`runs` runs, 10 per thread, 20 posted at a time; back when every workflow ended."""
    sem = asyncio.Semaphore(20)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def one(i: int) -> None:
            async with sem:
                resp = await http.post(
                    f"/threads/{tag}-{i // 10}/runs",
                    json={"input": input_text, "model_options": {"bytes": reply_bytes}},
                )
                resp.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(runs)))


async def settle(db_url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while read_one(db_url, ACTIVE_SQL) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError("runs still active")
        await asyncio.sleep(0.2)  # paces polling the workflows' statuses


def read_one(url: str, sql: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
        return int(row[0]) if row else 0


def per_run(before: dict[str, int], after: dict[str, int], runs: int) -> dict[str, float]:
    return {k: (after.get(k, 0) - before.get(k, 0)) / runs for k in after}


def schema_sum(sizes: dict[str, float], schema: str) -> float:
    return sum(v for k, v in sizes.items() if k.startswith(schema + "."))


async def main(args: argparse.Namespace) -> None:
    input_text = ("input " * (args.input_bytes // 6 + 1))[: args.input_bytes]
    with Stack() as stack:
        db_url = stack.new_database("storage")
        env = pod_env(
            db_url,
            stack.nats.url,
            polling_s=None,
            model="bench.text_source:make",
            retention_days=0,  # the sweep below is run by hand
            coalesce_ms=0,
        )
        p = pod("storage-0", env, stack.root)
        await p.start()
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
            say(f"warm-up: {args.warmup} runs ...")
            await batch(p.url, "warm", args.warmup, args.reply_bytes, input_text)
            await settle(db_url)
            vacuum(db_url)
            disk0, live0 = read(db_url, SIZES_SQL), read(db_url, LIVE_SQL)
            say(f"measuring {args.runs} runs ...")
            t0 = time.monotonic()
            await batch(p.url, "m", args.runs, args.reply_bytes, input_text)
            await settle(db_url)
            took = time.monotonic() - t0
            disk1 = read(db_url, SIZES_SQL)
            vacuum(db_url)
            live1 = read(db_url, LIVE_SQL)
            disk = per_run(disk0, disk1, args.runs)
            live = per_run(live0, live1, args.runs)

            # Retention: every run aged 40 days, one sweep of their workflows.
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE threadgate.runs SET finished_at = finished_at - interval '40 days'"
                )
                conn.execute(
                    "UPDATE dbos.workflow_status SET created_at = created_at - 40::bigint * 86400000"
                )
            await sweep(db_url, stack.nats.url)
            vacuum(db_url)
            live2 = read(db_url, LIVE_SQL)
            total_runs = args.warmup + args.runs
            kept = {k: v / total_runs for k, v in live2.items()}
        finally:
            await p.stop()

    payload = args.reply_bytes + args.input_bytes
    rows: list[list[object]] = []
    for name in sorted(disk, key=lambda k: -disk[k]):
        if abs(disk[name]) >= 1 or abs(live[name]) >= 1:
            rows.append([name, f"{disk[name]:.0f}", f"{live[name]:.0f}", f"{kept[name]:.0f}"])
    for schema in ("dbos", "threadgate"):
        rows.append(
            [
                f"{schema}.* (sum)",
                f"{schema_sum(disk, schema):.0f}",
                f"{schema_sum(live, schema):.0f}",
                f"{schema_sum(kept, schema):.0f}",
            ]
        )
    total_disk, total_live, total_kept = sum(disk.values()), sum(live.values()), sum(kept.values())
    rows.append(["all", f"{total_disk:.0f}", f"{total_live:.0f}", f"{total_kept:.0f}"])
    print(
        f"\nBytes per run: {args.runs} runs of a {args.reply_bytes}-byte reply and a "
        f"{args.input_bytes}-byte input ({took:.1f}s; {machine().get('cpu', '?')}):\n"
    )
    print(table(["table", "disk growth/run", "live bytes/run", "after retention/run"], rows))
    print(
        f"\nreply + input = {payload} bytes; disk growth {total_disk / payload:.2f}x, "
        f"live {total_live / payload:.2f}x; after the workflow is deleted "
        f"{total_kept / payload:.2f}x (the conversation)"
    )


async def sweep(db_url: str, nats_url: str) -> dict[str, Any]:
    """One retention sweep with DBOS launched in this process (its delete_workflows)."""
    from dbos import DBOS
    from threadgate.main import dbos_config
    from threadgate.retention import Retention
    from threadgate.settings import load_settings
    from threadgate.store.db import Database

    settings = load_settings(
        database_url=db_url, nats_url=nats_url, pod_name="storage-sweeper", log_level="WARNING"
    )
    DBOS(config=dbos_config(settings))
    DBOS.launch()
    db = Database(db_url)
    await db.open()
    try:
        swept = await Retention(settings, db).sweep()
    finally:
        await db.close()
        DBOS.destroy()
        # DBOS took over the loop's default executor and shut it down with itself.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor())
    return {"swept": swept}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--reply-bytes", type=int, default=3900)
    parser.add_argument("--input-bytes", type=int, default=200)
    run_async(lambda: main(parser.parse_args()))
