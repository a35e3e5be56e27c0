"""Runs nobody will finish by themselves, and the pod's background loop that finds them.

DBOS recovers a pod's PENDING workflows only when a process with the same executor id and
application version launches, and a queue worker claims only its own version's runs. So:

- a name that never comes back (StatefulSet scaled down, node lost for good): a surviving pod
  adopts its runs once its fencing claim is free, its heartbeat is older than `adopt_after_s`,
  and the survivor itself has heartbeated without a break for that long (after a database
  outage every heartbeat looks old). Holding the departed name's claim while adopting makes it
  exactly-once among racing survivors and impossible while the name is alive.
- runs queued under a version no live pod runs (a rolling deploy drained the old pods): nothing
  of theirs ran, so any live pod moves them to its own version, at start and every check.
- runs that did run under such a version (stranded: a name came back on a new version, or left
  during a deploy): listed (GET /admin/stranded, a metric, the log) and moved to this version
  when the workflow's steps are unchanged — by the checks (THREADGATE_AUTO_ADOPT) or by an
  operator (`threadgate adopt`); runs whose steps differ wait for `threadgate adopt --force`.
- run rows still pending/running whose workflow DBOS already ended (dead-lettered after
  repeated crashes, failed, cancelled by an operator): finished with their error and `done`,
  by one pod of the cluster at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from ..identity import CLAIM_SQL, LIVE_EXECUTORS_SQL, claim_key, process_label
from ..settings import Settings
from ..store.db import Database
from ..store.runs import PgRunStore
from ..streams.buffer import StreamBuffer
from ..streams.events import DoneStatus, done, run_started
from .internals import reenqueue
from .thread_run import RETIRED_STEPS, STEP_NAMES, WORKFLOW_NAME

logger = logging.getLogger(__name__)

_RECONCILER_LOCK = 0x7467_7263  # "tgrc": one reconciler per cluster at a time

# ENQUEUED runs of a version no live pod runs, that never ran a step: safe for any version.
MOVE_QUEUED_SQL = f"""
WITH live AS ({LIVE_EXECUTORS_SQL})
UPDATE dbos.workflow_status w SET application_version = %(me)s
WHERE w.name = %(name)s AND w.status = 'ENQUEUED'
  AND coalesce(w.application_version, '') <> %(me)s
  AND coalesce(w.application_version, '') NOT IN (SELECT app_version FROM live)
  AND NOT EXISTS (SELECT 1 FROM dbos.operation_outputs o WHERE o.workflow_uuid = w.workflow_uuid)
RETURNING w.workflow_uuid AS run_id
"""

# What no live pod will ever run as things stand.
STRANDED_SQL = f"""
WITH live AS ({LIVE_EXECUTORS_SQL})
SELECT w.workflow_uuid AS run_id, w.executor_id AS executor,
       coalesce(w.application_version, '') AS app_version,
       CASE w.status WHEN 'ENQUEUED' THEN 'queued' ELSE 'pending' END AS status,
       coalesce(array_agg(o.function_name ORDER BY o.function_id)
                FILTER (WHERE o.function_name IS NOT NULL), '{{}}') AS steps,
       (w.created_at / 1000.0)::float8 AS created_at
FROM dbos.workflow_status w
LEFT JOIN dbos.operation_outputs o ON o.workflow_uuid = w.workflow_uuid
WHERE w.name = %(name)s AND w.status IN ('ENQUEUED', 'PENDING')
  AND (
    (w.status = 'ENQUEUED'
       AND coalesce(w.application_version, '') NOT IN (SELECT app_version FROM live))
    OR (w.status = 'PENDING' AND EXISTS (
          SELECT 1 FROM live l
          WHERE l.name = w.executor_id
            AND l.app_version <> coalesce(w.application_version, '')))
    OR (w.status = 'PENDING'
        AND NOT EXISTS (SELECT 1 FROM live l WHERE l.name = w.executor_id)
        AND coalesce(w.application_version, '') NOT IN (SELECT app_version FROM live)))
GROUP BY w.workflow_uuid, w.executor_id, w.application_version, w.status, w.created_at
ORDER BY w.created_at
"""

# Run rows that wait for a workflow DBOS has already ended.
UNFINISHED_SQL = """
SELECT r.run_id, r.thread_id, r.attempt, r.seq, w.status AS workflow_status
FROM threadgate.runs r JOIN dbos.workflow_status w ON w.workflow_uuid = r.run_id
WHERE r.status IN ('pending', 'running')
  AND w.status IN ('ERROR', 'CANCELLED', 'MAX_RECOVERY_ATTEMPTS_EXCEEDED')
"""

ENDED_BY_DBOS = {
    "MAX_RECOVERY_ATTEMPTS_EXCEEDED": (
        "crashed_repeatedly",
        "the run's attempts kept killing the pods that ran it",
    ),
    "ERROR": ("internal", "the run's workflow failed"),
    "CANCELLED": ("cancelled", "the run's workflow was cancelled by an operator"),
}


@dataclass(frozen=True, slots=True)
class StrandedRun:
    run_id: str
    executor: str
    app_version: str
    status: str  # queued (ENQUEUED) | pending (PENDING)
    steps: list[str]

    @property
    def compatible(self) -> bool:
        """Its recorded steps are a prefix of today's: replaying it under this version is safe."""
        steps = list(self.steps)
        while steps and steps[-1] in RETIRED_STEPS:  # now code: it runs again, idempotent
            steps.pop()
        return steps == list(STEP_NAMES[: len(steps)])


class Adoption:
    """Heartbeats of this pod, and the runs that would otherwise wait forever."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        metrics: Any = None,
        buffer: StreamBuffer | None = None,
        started: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.buffer = buffer
        self.started = started  # claim now what was just made startable
        self.store = PgRunStore(db)
        # Loop time of the first beat of the current streak; a pod that just started has no
        # outage behind it: its view of the others is fresh (-inf: steady from the start).
        self.healthy_since: float | None = -math.inf

    async def heartbeat(self) -> None:
        async with self.db.pool.connection(timeout=max(self.settings.heartbeat_s, 1.0)) as conn:
            await conn.execute(
                """INSERT INTO threadgate.executors (name, app_version, last_seen)
                   VALUES (%s, %s, now())
                   ON CONFLICT (name) DO UPDATE
                   SET app_version = excluded.app_version, last_seen = now()""",
                (self.settings.pod_name, self.settings.app_version),
            )

    def steady_for(self, now: float) -> float:
        """Seconds this pod has heartbeated without a break (since its start: for ever)."""
        return 0.0 if self.healthy_since is None else now - self.healthy_since

    def steady(self) -> bool:
        """Whether this pod's view of the others' heartbeats can be trusted: after its own
        outage every other pod's heartbeat is as old as the outage, and each is still
        taking its claim back. Deaths are inferred only after a whole window of beats."""
        now = asyncio.get_running_loop().time()
        return self.steady_for(now) >= self.settings.adopt_after_s

    async def leave(self) -> None:
        """A clean stop: this name's row goes, so its version stops counting as live at once
        (queued runs of a version whose last pod left move without waiting for it to age)."""
        async with self.db.pool.connection(timeout=2.0) as conn:
            await conn.execute(
                "DELETE FROM threadgate.executors WHERE name = %s AND app_version = %s",
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

    @contextlib.asynccontextmanager
    async def _holding_claim(self, name: str) -> Any:
        """Hold a pod name's fencing claim (yields False when its process is alive)."""
        url = self.settings.database_url.get_secret_value()
        async with await psycopg.AsyncConnection.connect(
            url,
            autocommit=True,
            application_name=f"adopting {name} | {process_label(self.settings.pod_name)}"[:63],
        ) as conn:
            cur = await conn.execute(CLAIM_SQL, (claim_key(name),))
            row = await cur.fetchone()
            yield bool(row and row[0])
            # Closing the connection releases the claim; the name may come back now.

    async def adopt(self, name: str) -> list[str]:
        """Re-enqueue a departed executor's PENDING runs of this version, holding its claim.

        Returns the adopted run ids; nothing when the name is alive or another pod adopts it.
        """
        ids: list[str] = []
        async with self._holding_claim(name) as held:
            if not held:
                return []  # alive (or being adopted by another survivor right now)
            async with self.db.pool.connection() as conn:
                cur = await conn.execute(
                    """SELECT workflow_uuid AS run_id FROM dbos.workflow_status
                       WHERE status = 'PENDING' AND name = %s AND executor_id = %s
                         AND application_version = %s""",
                    (WORKFLOW_NAME, name, self.settings.app_version),
                )
                candidates = [r["run_id"] for r in await cur.fetchall()]
            for run_id in candidates:
                if await asyncio.to_thread(reenqueue, run_id, name):
                    ids.append(run_id)
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

    async def adopt_departed(self, now: float) -> list[str]:
        if not self.steady():
            return []  # after our own outage every heartbeat looks old: wait a full window
        adopted: list[str] = []
        for name in await self.departed():
            adopted += await self.adopt(name)
        if adopted:
            self._startable()
        return adopted

    async def reconcile(self) -> list[str]:
        """Enqueue runs whose accepting pod died between storing them and enqueuing them.

        Enqueue is idempotent by workflow id, so racing pods enqueue each run once.
        """
        from .runner import enqueue

        orphans = await self.store.pending_without_workflow(self.settings.orphan_after_s)
        for run in orphans:
            await enqueue(run)
            logger.warning(
                "enqueued an accepted run that had no workflow",
                extra={"thread_id": run.thread_id, "run_id": run.run_id},
            )
        if orphans:
            self._startable()
        return [r.run_id for r in orphans]

    async def move_queued(self) -> list[str]:
        """Take over queued runs of versions no live pod runs (nothing of theirs ran)."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                MOVE_QUEUED_SQL,
                {
                    "me": self.settings.app_version,
                    "name": WORKFLOW_NAME,
                    "fresh_s": self.settings.adopt_after_s,
                },
            )
            ids = [r["run_id"] for r in await cur.fetchall()]
        if ids:
            logger.warning(
                "took over %d queued runs of a version no live pod runs",
                len(ids),
                extra={"runs": ids},
            )
            self._startable()
        return ids

    def _startable(self) -> None:
        if self.started is not None:
            self.started()

    async def finish_ended(self) -> list[str]:
        """Finish run rows whose workflow DBOS ended without our finish step (one pod at a
        time in the cluster): the final status, the stored error, then `done`."""
        finished: list[str] = []
        async with self.db.pool.connection() as conn:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (_RECONCILER_LOCK,))
            row = await cur.fetchone()
            if not (row and row["ok"]):
                return []
            try:
                cur = await conn.execute(UNFINISHED_SQL)
                rows = await cur.fetchall()
                for r in rows:
                    code, message = ENDED_BY_DBOS[r["workflow_status"]]
                    status: DoneStatus = "cancelled" if code == "cancelled" else "error"
                    error = None if status == "cancelled" else {"code": code, "message": message}
                    attempt = await self.store.end_abandoned(
                        r["run_id"], self.settings.pod_name, status, error
                    )
                    if attempt is not None and self.buffer is not None:
                        run_id, seq = r["run_id"], r["seq"]
                        pub = self.buffer.publisher(r["thread_id"], run_id, attempt)
                        me = self.settings.pod_name
                        await pub.publish(run_started(run_id, attempt, None, me, seq), "start")
                        await pub.publish(done(run_id, attempt, status, error), "done")
                        await pub.flush()
                    finished.append(r["run_id"])
                    logger.warning(
                        "finished a run its workflow had ended: %s",
                        r["workflow_status"],
                        extra={"thread_id": r["thread_id"], "run_id": r["run_id"]},
                    )
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (_RECONCILER_LOCK,))
        return finished

    async def check(self, now: float) -> None:
        """Everything that finds runs nobody else would finish."""
        await self.move_queued()
        await self.adopt_departed(now)
        await self.reconcile()
        await self.finish_ended()
        stranded = await self.stranded()
        if self.settings.auto_adopt and self.steady() and any(r.compatible for r in stranded):
            await self.adopt_stranded()

    async def run(self) -> None:
        """The pod's background loop: heartbeat, then now and then the checks above."""
        loop = asyncio.get_running_loop()
        next_check = 0.0
        last_beat: float | None = loop.time() if self.healthy_since is not None else None
        gap = max(2 * self.settings.heartbeat_s, 1.0)
        while True:
            try:
                await self.heartbeat()
                now = loop.time()
                # A beat that waited out an outage (a pool wait, not an error) breaks the
                # streak as a failed one does: every other pod's beat is as old as ours.
                if self.healthy_since is None or last_beat is None or now - last_beat > gap:
                    self.healthy_since = now
                last_beat = now
            except Exception as exc:  # the database may be away: try again next beat
                self.healthy_since = None
                logger.warning("heartbeat failed: %r", exc)
            if self.healthy_since is not None and loop.time() >= next_check:
                next_check = loop.time() + self.settings.adopt_check_s
                try:
                    await self.check(loop.time())
                except Exception as exc:
                    logger.warning("adoption checks failed: %r", exc)
            await asyncio.sleep(self.settings.heartbeat_s)

    async def stranded(self) -> list[StrandedRun]:
        """Runs of the cluster that no live pod will run as things stand, oldest first."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                STRANDED_SQL, {"name": WORKFLOW_NAME, "fresh_s": self.settings.adopt_after_s}
            )
            rows = await cur.fetchall()
        runs = [
            StrandedRun(r["run_id"], r["executor"], r["app_version"], r["status"], list(r["steps"]))
            for r in rows
        ]
        if self.metrics is not None:
            self.metrics.stranded.set(len(runs))
        return runs

    async def adopt_stranded(
        self, run_ids: list[str] | None = None, *, force: bool = False
    ) -> tuple[list[str], list[str]]:
        """Move stranded runs (all, or exactly `run_ids`) to this version and recover them.

        Only runs whose recorded steps match today's workflow move, unless `force`. Nothing
        else is touched: a live run of this version is never re-enqueued. Returns (adopted,
        refused): refused are the incompatible ones and asked-for ids that are not stranded.
        """
        runs = await self.stranded()
        wanted = [r for r in runs if run_ids is None or r.run_id in run_ids]
        movable = [r for r in wanted if force or r.compatible]
        refused = [r.run_id for r in wanted if r not in movable]
        if run_ids is not None:
            known = {r.run_id for r in runs}
            refused += [i for i in run_ids if i not in known]
        adopted = [r.run_id for r in movable if await self._move(r)]
        if adopted:
            self._startable()
            logger.warning(
                "adopted %d stranded runs into version %s",
                len(adopted),
                self.settings.app_version,
                extra={"runs": adopted},
            )
        await self.stranded()
        return adopted, refused

    async def _move(self, run: StrandedRun) -> bool:
        me = self.settings.app_version
        if run.status == "queued":
            async with self.db.pool.connection() as conn:
                cur = await conn.execute(
                    """UPDATE dbos.workflow_status SET application_version = %s
                       WHERE workflow_uuid = %s AND status = 'ENQUEUED'
                         AND coalesce(application_version, '') = %s""",
                    (me, run.run_id, run.app_version),
                )
                return cur.rowcount == 1
        # PENDING: hold the name's claim if its process is gone, so that it cannot come back
        # and recover the run between the two statements. If the name is alive, it runs
        # another version (or the run would not be stranded): that process never runs it.
        async with self._holding_claim(run.executor):
            async with self.db.pool.connection() as conn:
                cur = await conn.execute(
                    """UPDATE dbos.workflow_status SET application_version = %s
                       WHERE workflow_uuid = %s AND status = 'PENDING' AND executor_id = %s
                         AND coalesce(application_version, '') = %s""",
                    (me, run.run_id, run.executor, run.app_version),
                )
                if cur.rowcount != 1:
                    return False
            return await asyncio.to_thread(reenqueue, run.run_id, run.executor)


async def report_stranded(adoption: Adoption) -> None:
    with contextlib.suppress(Exception):
        runs = await adoption.stranded()
        if runs:
            logger.warning(
                "%d runs belong to an application version no live pod runs and will not be "
                "recovered by themselves: %s. If the workflow's steps are unchanged, run "
                "`threadgate adopt` (see README, Upgrades).",
                len(runs),
                ", ".join(f"{r.run_id}@{r.app_version}" for r in runs),
            )
