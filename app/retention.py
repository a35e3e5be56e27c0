"""How long finished runs stay: the background job that deletes them once they are old.

Two ages (docs/deploy.md, "Storage and retention"):
- THREADGATE_RETENTION_DAYS: a finished run's DBOS workflow (its status row, inputs, step
  outputs — the reply's checkpoint —, events and streams) leaves, by DBOS's own
  `delete_workflows`. The run's row and its messages stay: they are the conversation.
- THREADGATE_MESSAGES_RETENTION_DAYS: the conversation itself, each finished run's row and its
  two messages (and its workflow, if still there). 0, the default, keeps it forever. A thread's
  row (its owner) always stays, so nobody else can take the thread id over.

Finished means both: the run's row is terminal (success, error, cancelled, interrupted) AND its
workflow, if it has one, is no longer PENDING, ENQUEUED or DELAYED (a run cancelled while it
waited is terminal before its workflow is dequeued). Nothing else is ever selected, and the
final delete of the rows checks the row's status again. threadgate never resumes a finished
workflow, so one cannot come back to life between the selection and DBOS's delete.

One pod at a time (a session advisory lock), in batches, every THREADGATE_RETENTION_CHECK_S
(an hour): an idle pod pays one lock attempt per hour.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .metrics import Metrics
from .settings import Settings
from .store.db import Database
from .store.runs import TERMINAL
from .workflows.thread_run import WORKFLOW_NAME

logger = logging.getLogger(__name__)

# Spelt out, not a parameter: the planner matches runs_finished's partial-index predicate.
_TERMINAL_SQL = "(" + ", ".join(f"'{s}'" for s in TERMINAL) + ")"

_RETENTION_LOCK = 0x7467_7274  # "tgrt": one sweeper per cluster at a time
DAY_S = 86400.0
# A sweep's batches: bounded (MAX_BATCHES x THREADGATE_RETENTION_BATCH runs per sweep, the
# rest next time) and paced, so a backlog never monopolizes the database.
MAX_BATCHES = 500
PAUSE_S = 0.05

# Finished runs whose workflow is older than the cut-off, oldest first. The scan walks DBOS's
# created_at index, which holds only what retention has not deleted yet.
OLD_WORKFLOWS_SQL = f"""
SELECT w.workflow_uuid AS run_id
FROM dbos.workflow_status w
JOIN threadgate.runs r ON r.run_id = w.workflow_uuid
WHERE w.name = %(name)s
  AND w.created_at < %(cutoff_ms)s
  AND w.status NOT IN ('PENDING', 'ENQUEUED', 'DELAYED')
  AND r.status IN {_TERMINAL_SQL}
  AND r.finished_at < now() - make_interval(secs => %(age_s)s)
ORDER BY w.created_at
LIMIT %(batch)s
"""

# Finished runs (rows) older than the conversation's cut-off, oldest first (runs_finished).
OLD_RUNS_SQL = f"""
SELECT r.run_id, (w.workflow_uuid IS NOT NULL) AS has_workflow
FROM threadgate.runs r
LEFT JOIN dbos.workflow_status w ON w.workflow_uuid = r.run_id
WHERE r.status IN {_TERMINAL_SQL}
  AND r.finished_at < now() - make_interval(secs => %(age_s)s)
  AND (w.workflow_uuid IS NULL OR w.status NOT IN ('PENDING', 'ENQUEUED', 'DELAYED'))
ORDER BY r.finished_at
LIMIT %(batch)s
"""

# One statement: messages first (their foreign key is checked at the statement's end).
DELETE_RUNS_SQL = f"""
WITH gone AS (
    SELECT run_id FROM threadgate.runs
    WHERE run_id = ANY(%(ids)s) AND status IN {_TERMINAL_SQL}
), m AS (
    DELETE FROM threadgate.messages WHERE run_id IN (SELECT run_id FROM gone)
)
DELETE FROM threadgate.runs WHERE run_id IN (SELECT run_id FROM gone)
"""


# A run's trace context (app/tracing.py) is of no use once its workflow is gone.
DELETE_TRACES_SQL = "DELETE FROM threadgate.run_traces WHERE run_id = ANY(%s)"


@dataclass
class Swept:
    """What one sweep deleted: runs whose workflow left, runs that left altogether."""

    workflows: int = 0
    conversations: int = 0


DeleteWorkflows = Callable[[list[str]], Awaitable[None]]


async def dbos_delete(ids: list[str]) -> None:
    """DBOS's own delete: the status row, and the inputs, outputs and step outputs that carry
    no foreign key to it, in one transaction (events and streams cascade)."""
    from dbos import DBOS

    await DBOS.delete_workflows_async(ids)


class Retention:
    """The sweeper; `run()` is the pod's background loop, `sweep()` one pass."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        metrics: Metrics | None = None,
        delete_workflows: DeleteWorkflows = dbos_delete,
    ) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.delete_workflows = delete_workflows

    @property
    def enabled(self) -> bool:
        s = self.settings
        return s.retention_days > 0 or s.messages_retention_days > 0

    async def run(self) -> None:
        """Sweep now and then. The first sweep comes after a random part of the interval, so
        pods started together do not all try at once (one would win the lock anyway)."""
        interval = self.settings.retention_check_s
        await asyncio.sleep(random.uniform(0.1, 1.0) * interval)
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # the database may be away: next time
                logger.warning("retention sweep failed: %r", exc)
            await asyncio.sleep(interval)

    async def sweep(self) -> Swept | None:
        """One pass, if no other pod is sweeping (None then)."""
        if not self.enabled:
            return None
        async with self.db.pool.connection() as lock:
            cur = await lock.execute("SELECT pg_try_advisory_lock(%s) AS ok", (_RETENTION_LOCK,))
            row = await cur.fetchone()
            if not (row and row["ok"]):
                return None
            try:
                started = time.monotonic()
                swept = Swept()
                if self.settings.messages_retention_days > 0:
                    swept.conversations = await self._sweep_conversations()
                if self.settings.retention_days > 0:
                    swept.workflows = await self._sweep_workflows()
            finally:
                await lock.execute("SELECT pg_advisory_unlock(%s)", (_RETENTION_LOCK,))
        if self.metrics is not None:
            self.metrics.retention_deleted.labels(part="workflow").inc(swept.workflows)
            self.metrics.retention_deleted.labels(part="conversation").inc(swept.conversations)
            self.metrics.retention_swept.set(time.time())
        if swept.workflows or swept.conversations:
            logger.info(
                "retention: deleted %d finished runs' workflows and %d finished runs in %.1fs",
                swept.workflows,
                swept.conversations,
                time.monotonic() - started,
            )
        return swept

    def _params(self, days: float) -> dict[str, object]:
        age_s = days * DAY_S
        return {
            "name": WORKFLOW_NAME,
            "age_s": age_s,
            "cutoff_ms": int((time.time() - age_s) * 1000),
            "batch": self.settings.retention_batch,
        }

    async def _sweep_workflows(self) -> int:
        params = self._params(self.settings.retention_days)
        deleted = 0
        for _ in range(MAX_BATCHES):
            async with self.db.pool.connection() as conn:
                cur = await conn.execute(OLD_WORKFLOWS_SQL, params)
                ids = [r["run_id"] for r in await cur.fetchall()]
            if ids:
                await self.delete_workflows(ids)
                async with self.db.pool.connection() as conn:
                    await conn.execute(DELETE_TRACES_SQL, (ids,))
                deleted += len(ids)
            if len(ids) < self.settings.retention_batch:
                break
            await asyncio.sleep(PAUSE_S)  # room for the real work
        return deleted

    async def _sweep_conversations(self) -> int:
        params = self._params(self.settings.messages_retention_days)
        deleted = 0
        for _ in range(MAX_BATCHES):
            async with self.db.pool.connection() as conn:
                cur = await conn.execute(OLD_RUNS_SQL, params)
                rows = await cur.fetchall()
            # The workflows first: a pod dying in between leaves rows the next sweep finds,
            # never a workflow without its run.
            with_workflow = [r["run_id"] for r in rows if r["has_workflow"]]
            if with_workflow:
                await self.delete_workflows(with_workflow)
            ids = [r["run_id"] for r in rows]
            if ids:
                async with self.db.pool.connection() as conn:
                    cur = await conn.execute(DELETE_RUNS_SQL, {"ids": ids})
                    deleted += cur.rowcount
            if len(rows) < self.settings.retention_batch:
                break
            await asyncio.sleep(PAUSE_S)
        return deleted
