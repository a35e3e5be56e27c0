"""Pod identity and executor fencing: at most one live process may execute as a POD_NAME.

DBOS double-executes when two processes share an executor id, so a pod holds a PostgreSQL
advisory lock named after its POD_NAME on a dedicated connection for as long as it lives. The
server drops the lock when the process dies (SIGKILL included), so a restarted pod gets it at
once; a second live process with the same name waits, then exits naming the holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from .errors import ConfigError
from .store.db import unsolicited

logger = logging.getLogger(__name__)

CLAIM_SQL = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
HOLDER_SQL = """
WITH k AS (SELECT hashtextextended(%s, 0) AS key)
SELECT a.application_name, a.client_addr::text AS addr, a.backend_start
FROM k, pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = ((k.key >> 32) & 4294967295)::oid
  AND l.objid = (k.key & 4294967295)::oid
"""

# Pods that may be alive (name and the version they heartbeat): their fencing claim is held,
# or they heartbeated within %(fresh_s)s. A database restart drops every claim at once, so
# a claim alone would declare the whole fleet dead until each pod takes its own back; a pod
# that stops cleanly deletes its row, so only a crashed one needs the heartbeat to age.
LIVE_EXECUTORS_SQL = """
SELECT e.name, e.app_version FROM threadgate.executors e
WHERE e.last_seen > now() - make_interval(secs => %(fresh_s)s)
   OR EXISTS (
  SELECT 1 FROM pg_locks l
  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
    AND l.classid = ((hashtextextended('threadgate.executor:' || e.name, 0) >> 32)
                     & 4294967295)::oid
    AND l.objid = (hashtextextended('threadgate.executor:' || e.name, 0) & 4294967295)::oid)
"""
# Which of these pod names (%s: a text[]) have a live process, by their fencing claim.
ALIVE_SQL = """
SELECT n AS name FROM unnest(%s::text[]) AS n
WHERE EXISTS (
  SELECT 1 FROM pg_locks l
  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
    AND l.classid = ((hashtextextended('threadgate.executor:' || n, 0) >> 32)
                     & 4294967295)::oid
    AND l.objid = (hashtextextended('threadgate.executor:' || n, 0) & 4294967295)::oid)
"""

KEEPALIVE_OPTIONS = (
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
)
# The client side of the same (store.db.tcp_options gives the pod's settings instead).
CLIENT_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def claim_key(pod_name: str) -> str:
    return f"threadgate.executor:{pod_name}"  # LIVE_EXECUTORS_SQL builds the same key


def process_label(pod_name: str) -> str:
    return f"threadgate {pod_name} pid={os.getpid()} host={socket.gethostname()}"[:63]


class ClaimLost(Exception):
    """Another process holds this pod's name."""


class ExecutorClaim:
    """The advisory lock that fences one executor id, watched for as long as the pod runs."""

    QUERY_EVERY_S = 60.0

    def __init__(
        self,
        url: str,
        pod_name: str,
        *,
        on_lost: Callable[[str], None] | None = None,
        check_every_s: float = 5.0,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.pod_name = pod_name
        self.key = claim_key(pod_name)
        self.conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self.held = False
        self.check_every_s = check_every_s
        self.on_lost = on_lost or _exit_on_lost
        self._watch: asyncio.Task[None] | None = None
        self.connect_kwargs = dict(connect_kwargs or CLIENT_KEEPALIVES)

    async def acquire(self, timeout_s: float) -> None:
        """Take the claim, waiting up to `timeout_s` for a previous holder to go away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = 0.1
        while True:
            if await self._try():
                logger.info("executor claim acquired", extra={"pod": self.pod_name})
                self._watch = asyncio.create_task(self._watch_claim(), name="executor-claim")
                return
            holder = await self.holder()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ConfigError(
                    f"POD_NAME {self.pod_name!r} is held by another live process ({holder}); "
                    "two processes under one executor id would run the same workflows twice. "
                    "Give each process its own POD_NAME."
                )
            logger.warning(
                "POD_NAME %s is held by %s; waiting",
                self.pod_name,
                holder,
                extra={"pod": self.pod_name},
            )
            # Wait out the whole timeout: a holder that is shutting down may let go at its end.
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)

    async def _try(self) -> bool:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(
                self.url,
                autocommit=True,
                application_name=process_label(self.pod_name),
                connect_timeout=5,
                # The lock lives as long as the server thinks this session does. After a node
                # loss no FIN ever comes: server-side keepalives end the session (and free the
                # name for adoption) in ~25 s instead of the kernel's default of hours.
                options=KEEPALIVE_OPTIONS,
                **self.connect_kwargs,
            )
        cur = await self.conn.execute(CLAIM_SQL, (self.key,))
        row = await cur.fetchone()
        self.held = bool(row and row[0])
        return self.held

    async def holder(self) -> str:
        try:
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                cur = await conn.execute(HOLDER_SQL, (self.key,))
                row = await cur.fetchone()
        except psycopg.Error as exc:
            return f"unknown ({exc.__class__.__name__})"
        if row is None:
            return "nobody"
        return f"{row[0] or 'unnamed client'} from {row[1] or 'local socket'} since {row[2]}"

    async def _watch_claim(self) -> None:
        """If the claim's connection drops, the lock is gone: take it back or stop executing.

        A dropped session shows on its socket without a round trip (the server's goodbye, or
        EOF once TCP keepalives gave up on a vanished peer); a `SELECT 1` is sent only then,
        or every QUERY_EVERY_S: an idle pod pays no transaction every few seconds for this.
        """
        loop = asyncio.get_running_loop()
        queried = loop.time()
        while True:
            await asyncio.sleep(self.check_every_s)
            try:
                assert self.conn is not None
                if not unsolicited(self.conn) and loop.time() - queried < self.QUERY_EVERY_S:
                    continue
                queried = loop.time()
                await self.conn.execute("SELECT 1")
                continue
            except Exception as exc:
                logger.warning(
                    "executor claim connection lost: %r", exc, extra={"pod": self.pod_name}
                )
            self.held = False
            await self._reclaim()

    async def _reclaim(self) -> None:
        delay = 0.2
        while True:
            try:
                if self.conn is not None:
                    with contextlib.suppress(Exception):
                        await self.conn.close()
                    self.conn = None
                if await self._try():
                    logger.info("executor claim re-acquired", extra={"pod": self.pod_name})
                    return
                holder = await self.holder()
                self.on_lost(holder)
                return
            except psycopg.Error:
                await asyncio.sleep(delay)  # the database is still away: try again
                delay = min(delay * 2, 5.0)

    async def release(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()  # closing the session releases the lock
        self.held = False


def _exit_on_lost(holder: str) -> None:
    # Another process runs under our name now: any step we continue would run twice.
    logger.critical("executor claim taken by %s: exiting at once", holder)
    logging.shutdown()
    os._exit(70)
