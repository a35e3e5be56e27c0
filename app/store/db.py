"""The app's PostgreSQL connection pool and its schema migration."""

from __future__ import annotations

import logging
import select
import time
import weakref
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..settings import Settings

logger = logging.getLogger(__name__)

# Pods starting together would race on CREATE ... IF NOT EXISTS: one migrates at a time.
_MIGRATION_LOCK = 0x7467_6D69  # "tgmi"


def dbos_url(url: str) -> str:
    """The database URL in the form DBOS can take (it parses URLs with SQLAlchemy).

    libpq's multi-host form, `postgresql://u@h1:5432,h2:5432/db?target_session_attrs=
    read-write` (a primary and its standbys: connect to whichever is writable), works as such
    for psycopg (the app's pool, the fencing claim), but SQLAlchemy 2.1's URL parser reads
    `5432,h2:5432` as a port and fails. SQLAlchemy's own spelling of the same thing is one
    `host=h:port` query parameter per host, which its psycopg dialect turns back into libpq's
    lists. Single-host URLs are returned unchanged.
    """
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy import URL

    params = conninfo_to_dict(url)
    hosts = str(params.pop("host", "")).split(",")
    if len(hosts) < 2:
        return url
    ports = str(params.pop("port", "")).split(",")
    if len(ports) == 1:
        ports *= len(hosts)  # libpq: one port for every host
    if len(ports) != len(hosts):
        raise ConfigError("THREADGATE_DATABASE_URL: give one port, or one port per host")
    user, password, dbname = (
        params.pop("user", None),
        params.pop("password", None),
        params.pop("dbname", None),
    )
    query: dict[str, str | list[str]] = {k: str(v) for k, v in params.items()}
    query["host"] = [f"{h}:{p or 5432}" for h, p in zip(hosts, ports, strict=True)]
    sa_url = URL.create(
        "postgresql",
        username=str(user) if user is not None else None,
        password=str(password) if password is not None else None,
        database=str(dbname) if dbname is not None else None,
        query=query,
    )
    return sa_url.render_as_string(hide_password=False)


def tcp_options(settings: Settings) -> dict[str, int]:
    """libpq's TCP parameters for every connection a pod makes (pool, claim, DBOS's engine).

    Without them a primary that vanishes without a FIN (a node lost, a partition) leaves a
    query waiting for the kernel's retransmissions (~15 minutes) and an idle connection
    looking alive for hours. libpq ignores them on a Unix socket.
    """
    options = {
        "keepalives": 1,
        "keepalives_idle": settings.pg_keepalives_idle_s,
        "keepalives_interval": settings.pg_keepalives_interval_s,
        "keepalives_count": settings.pg_keepalives_count,
    }
    if settings.pg_tcp_user_timeout_s > 0:
        options["tcp_user_timeout"] = max(1, round(settings.pg_tcp_user_timeout_s * 1000))
    return options


class Database:
    """A pool that checks a connection before lending it only when it sat unused for a
    while: it heals after a database restart, and a busy pod pays no check per query."""

    # A check is a round trip and a committed transaction: 5 of a run's 25 transactions were
    # checks, and half of an idle pod's. A connection the server closed (a restart, a
    # terminated backend) has something to read on its socket, the server's goodbye or EOF:
    # that costs a poll, not a round trip, and is done on every loan. One that sat idle
    # longer than CHECK_IDLE_S is checked with a round trip too (a peer that vanished
    # without a word). A connection that breaks while lent fails its query, and the pool
    # discards it on return (callers retry transient errors).
    CHECK_IDLE_S = 60.0
    PING_FRESH_S = 5.0

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 8,
        timeout: float = 30.0,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self._returned: weakref.WeakKeyDictionary[AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )
        self.last_ok = 0.0  # monotonic time a connection last came back in good order
        self.pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            timeout=timeout,  # a connection's wait: PoolTimeout after it
            open=False,
            check=self._check,
            reset=self._on_return,
            kwargs={"autocommit": True, "row_factory": dict_row, **(connect_kwargs or {})},
            reconnect_timeout=0,  # keep trying forever; /readyz reports the outage
            name="threadgate",
        )

    async def _check(self, conn: AsyncConnection[Any]) -> None:
        at = self._returned.get(conn)
        if at is None or time.monotonic() - at > self.CHECK_IDLE_S or unsolicited(conn):
            await AsyncConnectionPool.check_connection(conn)

    async def _on_return(self, conn: AsyncConnection[Any]) -> None:
        self.last_ok = self._returned[conn] = time.monotonic()

    async def open(self, timeout: float = 30.0) -> None:
        await self.pool.open(wait=True, timeout=timeout)

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> bool:
        """PostgreSQL answers: a connection came back in good order within PING_FRESH_S (the
        pod's own queries say so, for free), or a `SELECT 1` does."""
        if time.monotonic() - self.last_ok < self.PING_FRESH_S:
            return True
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


def unsolicited(conn: Any) -> bool:
    """Whether an idle connection's socket has something to read: PostgreSQL sends nothing
    unasked to a session that is not listening, so it is the server's goodbye (a FATAL
    message before it closed the connection) or EOF. A poll, not a round trip."""
    try:
        fd = conn.pgconn.socket
        return bool(select.select([fd], [], [], 0)[0])
    except Exception:  # no socket any more: certainly not usable
        return True
