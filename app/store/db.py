"""The app's PostgreSQL connection pool and its schema migration."""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

logger = logging.getLogger(__name__)

# Pods starting together would race on CREATE ... IF NOT EXISTS: one migrates at a time.
_MIGRATION_LOCK = 0x7467_6D69  # "tgmi"


class Database:
    """A pool that checks each connection before lending it, so it heals after a restart."""

    def __init__(self, url: str, *, max_size: int = 8) -> None:
        self.url = url
        self.pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            open=False,
            check=AsyncConnectionPool.check_connection,
            kwargs={"autocommit": True, "row_factory": dict_row},
            reconnect_timeout=0,  # keep trying forever; /readyz reports the outage
            name="threadgate",
        )

    async def open(self, timeout: float = 30.0) -> None:
        await self.pool.open(wait=True, timeout=timeout)

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> bool:
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                await conn.execute("SELECT 1")
            return True
        except Exception:
            return False

    async def migrate(self) -> None:
        sql = resources.files(__package__).joinpath("schema.sql").read_text()
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
            try:
                await conn.execute(sql.encode())
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
        logger.info("schema ready")
