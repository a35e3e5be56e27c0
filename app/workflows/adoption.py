"""Runs nobody will recover by themselves: departed pod names, and other application versions.

DBOS recovers a pod's PENDING workflows only when a process with the same executor id and
application version launches. Two cases never get there:

- a name that never comes back (StatefulSet scaled down, node lost for good): a surviving pod
  adopts its runs once its fencing claim is free and its heartbeat is older than
  `adopt_after_s`. Holding the departed name's claim while adopting makes it exactly-once
  among racing survivors and impossible while the name is alive.
- runs left PENDING under this pod's name by another application version (a deploy that did
  not drain): reported at start-up (log, metric, GET /admin/stranded); an operator moves them
  to this version with `threadgate adopt` when the workflow's steps are unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from ..identity import CLAIM_SQL, claim_key, process_label
from ..settings import Settings
from ..store.db import Database
from .thread_run import STEP_NAMES, WORKFLOW_NAME

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StrandedRun:
    run_id: str
    executor: str
    app_version: str
    steps: list[str]

    @property
    def compatible(self) -> bool:
        """Its recorded steps are a prefix of today's: replaying it under this version is safe."""
        return self.steps == list(STEP_NAMES[: len(self.steps)])


class Adoption:
    """Heartbeats of this pod and adoption of the runs of pods that left for good."""

    def __init__(self, settings: Settings, db: Database, metrics: Any = None) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics

    async def heartbeat(self) -> None:
        async with self.db.pool.connection() as conn:
            await conn.execute(
                """INSERT INTO threadgate.executors (name, app_version, last_seen)
                   VALUES (%s, %s, now())
                   ON CONFLICT (name) DO UPDATE
                   SET app_version = excluded.app_version, last_seen = now()""",
                (self.settings.pod_name, self.settings.app_version),
            )

    async def departed(self) -> list[str]:
        """Executors with PENDING runs of this version whose heartbeat stopped long ago."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT DISTINCT w.executor_id AS name
                   FROM dbos.workflow_status w
                   LEFT JOIN threadgate.executors e ON e.name = w.executor_id
                   WHERE w.status = 'PENDING' AND w.name = %s
                     AND w.application_version = %s AND w.executor_id <> %s
                     AND (e.last_seen IS NULL
                          OR e.last_seen < now() - make_interval(secs => %s))""",
                (
                    WORKFLOW_NAME,
                    self.settings.app_version,
                    self.settings.pod_name,
                    self.settings.adopt_after_s,
                ),
            )
            return [row["name"] for row in await cur.fetchall()]

    async def adopt(self, name: str) -> list[str]:
        """Re-enqueue a departed executor's PENDING runs, holding its claim meanwhile.

        Returns the adopted run ids; nothing when the name is alive or another pod adopts it.
        """
        url = self.settings.database_url.get_secret_value()
        async with await psycopg.AsyncConnection.connect(
            url,
            autocommit=True,
            application_name=f"adopting {name} | {process_label(self.settings.pod_name)}"[:63],
        ) as conn:
            cur = await conn.execute(CLAIM_SQL, (claim_key(name),))
            row = await cur.fetchone()
            if not (row and row[0]):
                return []  # alive (or being adopted by another survivor right now)
            ids = await asyncio.to_thread(_recover, name)
            # Closing the connection releases the claim; the name may come back now.
        if ids:
            logger.warning(
                "adopted %d runs of departed pod %s",
                len(ids),
                name,
                extra={"executor": name, "runs": ids},
            )
            if self.metrics is not None:
                self.metrics.adopted.inc(len(ids))
        return ids

    async def reconcile(self) -> list[str]:
        """Enqueue runs whose accepting pod died between storing them and enqueuing them.

        Enqueue is idempotent by workflow id, so racing pods enqueue each run once.
        """
        from ..store.runs import PgRunStore
        from .runner import enqueue

        orphans = await PgRunStore(self.db).pending_without_workflow(self.settings.orphan_after_s)
        for run in orphans:
            await enqueue(run)
            logger.warning(
                "enqueued an accepted run that had no workflow",
                extra={"thread_id": run.thread_id, "run_id": run.run_id},
            )
        return [r.run_id for r in orphans]

    async def adopt_departed(self) -> list[str]:
        adopted: list[str] = []
        for name in await self.departed():
            adopted += await self.adopt(name)
        return adopted

    async def run(self) -> None:
        """The pod's background loop: heartbeat, then look for departed names."""
        next_adopt = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.heartbeat()
                if loop.time() >= next_adopt:
                    next_adopt = loop.time() + self.settings.adopt_check_s
                    await self.adopt_departed()
                    await self.reconcile()
            except Exception as exc:  # the database may be away: try again next beat
                logger.warning("heartbeat/adoption failed: %r", exc)
            await asyncio.sleep(self.settings.heartbeat_s)

    async def stranded(self) -> list[StrandedRun]:
        """PENDING runs under this pod's name with another application version."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT w.workflow_uuid AS run_id, w.executor_id AS executor,
                          w.application_version AS app_version,
                          coalesce(array_agg(o.function_name ORDER BY o.function_id)
                                   FILTER (WHERE o.function_name IS NOT NULL), '{}') AS steps
                   FROM dbos.workflow_status w
                   LEFT JOIN dbos.operation_outputs o ON o.workflow_uuid = w.workflow_uuid
                   WHERE w.status = 'PENDING' AND w.name = %s AND w.executor_id = %s
                     AND w.application_version <> %s
                   GROUP BY w.workflow_uuid, w.executor_id, w.application_version""",
                (WORKFLOW_NAME, self.settings.pod_name, self.settings.app_version),
            )
            rows = await cur.fetchall()
        runs = [
            StrandedRun(r["run_id"], r["executor"], r["app_version"], list(r["steps"]))
            for r in rows
        ]
        if self.metrics is not None:
            self.metrics.stranded.set(len(runs))
        return runs

    async def adopt_stranded(self, *, force: bool = False) -> tuple[list[str], list[str]]:
        """Move this pod's stranded runs to this version and recover them.

        Only runs whose recorded steps match today's workflow move, unless `force`.
        Returns (adopted, refused) run ids.
        """
        runs = await self.stranded()
        movable = [r.run_id for r in runs if force or r.compatible]
        refused = [r.run_id for r in runs if r.run_id not in movable]
        if movable:
            async with self.db.pool.connection() as conn:
                await conn.execute(
                    """UPDATE dbos.workflow_status SET application_version = %s
                       WHERE workflow_uuid = ANY(%s) AND status = 'PENDING' AND executor_id = %s""",
                    (self.settings.app_version, movable, self.settings.pod_name),
                )
            await asyncio.to_thread(_recover, self.settings.pod_name)
            logger.warning(
                "adopted %d stranded runs into version %s",
                len(movable),
                self.settings.app_version,
                extra={"runs": movable},
            )
        await self.stranded()
        return movable, refused


def _recover(executor: str) -> list[str]:
    """DBOS's own recovery for an executor: re-enqueue its PENDING runs of this version.

    The runs keep their queue and partition, so one-run-per-thread still holds; the
    re-enqueue is conditional on PENDING and the executor id, so repeating it is harmless.
    """
    from dbos import DBOS

    handles = DBOS._recover_pending_workflows([executor])
    return [h.workflow_id for h in handles]


async def report_stranded(adoption: Adoption) -> None:
    with contextlib.suppress(Exception):
        runs = await adoption.stranded()
        if runs:
            logger.warning(
                "%d runs under this pod's name belong to another application version and will "
                "not be recovered by it: %s. If the workflow's steps are unchanged, run "
                "`threadgate adopt` (see README, Upgrades).",
                len(runs),
                ", ".join(f"{r.run_id}@{r.app_version}" for r in runs),
            )
