"""Run inside a private network namespace (`unshare -n`): a PostgreSQL whose packets are
dropped mid-query, and how long a pod's connections take to give up on it.

SIGSTOP does not make a black hole: the frozen server's kernel still acknowledges every packet,
so neither keepalives nor tcp_user_timeout ever fire (only a client-side bound ends the wait,
which is what /readyz has). A lost node or a partition drops packets: here a `blackhole` route
for 127.0.0.1 in a namespace of our own, touching nothing outside it. Prints one JSON object:
seconds each stalled query took to fail (null: still stalled at the cap).

    unshare -n python -m tests.integration.blackhole TCP_USER_TIMEOUT_S CAP_S
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


async def pool_query_stall(
    db: Any, cap_s: float, opened: asyncio.Event, holes: asyncio.Event
) -> float | None:
    """A query on the app's pool, sent into the black hole: seconds until it fails."""
    async with db.pool.connection() as conn:
        await conn.execute("SELECT 1")
        opened.set()
        await holes.wait()
        started = time.monotonic()
        try:
            await asyncio.wait_for(conn.execute("SELECT 1"), cap_s)
        except TimeoutError:
            return None
        except Exception:
            return time.monotonic() - started
    raise AssertionError("the query answered through a black hole")


def engine_query_stall(
    engine: Any, ready: threading.Event, holes: threading.Event, result: dict[str, float]
) -> None:
    """The same on a connection of DBOS's SQLAlchemy engine (its psycopg connect_args); in a
    daemon thread of its own, since a stalled one never ends."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        conn.commit()
        ready.set()
        holes.wait()
        started = time.monotonic()
        try:
            conn.execute(sa.text("SELECT 1"))
        except Exception:
            result["t"] = time.monotonic() - started


async def main(tcp_user_timeout_s: float, cap_s: float) -> dict[str, Any]:
    from dbos import DBOS
    from dbos._dbos import _get_dbos_instance
    from threadgate.devstack import Postgres
    from threadgate.main import dbos_config
    from threadgate.settings import load_settings
    from threadgate.store.db import Database, tcp_options

    ip("link", "set", "lo", "up")
    root = Path(tempfile.mkdtemp(prefix="threadgate-blackhole-", dir="/tmp"))
    os.chmod(root, 0o755)  # PostgreSQL's unprivileged account must reach its data directory
    pg = Postgres(root / "pg", fast=True)
    pg.start()
    try:
        settings = load_settings(
            database_url=pg.url("threadgate"),
            pod_name="blackhole-0",
            pg_tcp_user_timeout_s=tcp_user_timeout_s,
            log_level="WARNING",
        )
        DBOS(config=dbos_config(settings))
        DBOS.launch()
        logging.getLogger("dbos").setLevel(logging.CRITICAL)  # its retries against the hole
        engine = _get_dbos_instance()._sys_db.engine
        db = Database(
            settings.database_url.get_secret_value(), connect_kwargs=tcp_options(settings)
        )
        await db.open()

        opened, holes = asyncio.Event(), asyncio.Event()
        engine_ready, thread_holes = threading.Event(), threading.Event()
        engine_result: dict[str, float] = {}
        pool_task = asyncio.create_task(pool_query_stall(db, cap_s, opened, holes))
        worker = threading.Thread(
            target=engine_query_stall,
            args=(engine, engine_ready, thread_holes, engine_result),
            daemon=True,
        )
        worker.start()
        # Both connections opened and answered once; each now waits for the hole.
        await asyncio.wait_for(opened.wait(), 30)
        assert engine_ready.wait(30)
        ip("route", "replace", "blackhole", "127.0.0.1/32", "table", "local")
        started = time.monotonic()
        holes.set()
        thread_holes.set()
        pool_s = await pool_task
        worker.join(max(0.0, cap_s - (time.monotonic() - started)))
        return {
            "pool_s": pool_s,
            "dbos_engine_s": engine_result.get("t"),
            "tcp_options": tcp_options(settings),
            "engine_connect_args": dbos_config(settings)["db_engine_kwargs"]["connect_args"],  # type: ignore[index]
        }
    finally:
        pg.stop(kill=True)
        shutil.rmtree(root, ignore_errors=True)


async def run(tcp_user_timeout_s: float, cap_s: float) -> None:
    print(json.dumps(await main(tcp_user_timeout_s, cap_s)), flush=True)
    # Now, from inside the loop: DBOS's threads and a stalled connection may never end, and
    # asyncio.run's clean-up would wait for them.
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(run(float(sys.argv[1]), float(sys.argv[2])))
