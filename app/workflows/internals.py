"""The DBOS internals threadgate relies on, each behind one small function (dbos==3.4.0).

DBOS's public API has no call for these: stopping its background threads without blocking the
event loop (drain), listing the workflows this process executes, re-enqueuing chosen PENDING
workflows (adoption), a workflow's recovery bound set from settings, slower polling of what we
do not use, and the hot path of a run: its enqueue row written in the accept's transaction
(`enqueue_in`), the claim of startable runs as one asynchronous statement with DBOS's own
predicate (`claim`), and their dispatch on the running loop (`dispatch`), skipping DBOS's step
checks where the claim showed that no step output exists. dbos is pinned;
tests/unit/test_dbos_internals.py fails loudly when an upgrade moves one of them, and
tests/integration/test_claim.py races our claim against DBOS's own on the same tables.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

logger = logging.getLogger(__name__)


def quiet_background(seconds: float) -> None:
    """Before launch: DBOS's internal queue (its scheduler and `resume_workflow` use it; our
    runs never do) and its background jobs (DELAYED workflows and DBOS's own workflow
    timeouts, neither of which threadgate uses) poll every `seconds`, not every second: an
    idle pod should cost next to nothing."""
    from dbos import _workflow_commands

    _workflow_commands._BACKGROUND_JOBS_INTERVAL_SEC = seconds
    dbos_instance()._registry.get_internal_queue()._polling_interval_sec = seconds


def quiet_queue_manager(check_s: float) -> None:
    """Before launch: DBOS's queue manager thread (dbos 3.4.0 `_queue.queue_thread`) lists the
    queues every second, to start a worker thread per queue: a committed transaction a second,
    idle or not. This one is DBOS's, with the listing every `check_s` and at once on
    `wake_queue_manager()` (after a queue is registered, so that its worker starts at once).
    Its scheduler's first minute of polling every second goes too (we schedule nothing)."""
    import dbos._dbos as dbos_module
    from dbos import _scheduler
    from dbos._queue import log_queues, queue_worker_thread
    from dbos._utils import INTERNAL_QUEUE_NAME

    _scheduler._STARTUP_FAST_POLL_DURATION_SEC = 0.0

    def queue_thread(stop_event: threading.Event, dbos: Any) -> None:
        threads: dict[str, threading.Thread] = {}
        log_queues(dbos, dbos._listening_queues)
        while not stop_event.is_set():
            current: dict[str, Any] = {}
            listening = set(dbos._listening_queues) if dbos._listening_queues is not None else None
            try:
                for queue in dbos._sys_db.list_queues(application_name=dbos._sys_db.app_name):
                    if listening is not None and queue.name not in listening:
                        continue
                    if queue.name in threads and threads[queue.name].is_alive():
                        continue
                    current[queue.name] = queue
            except Exception as exc:
                dbos.logger.warning(f"Exception listing queues: {exc}")
            current[INTERNAL_QUEUE_NAME] = dbos._registry.get_internal_queue()
            for queue in dbos._registry.internal_queues():
                current[queue.name] = queue
            for name, queue in current.items():
                if name not in threads or not threads[name].is_alive():
                    thread = threading.Thread(
                        target=queue_worker_thread,
                        args=(stop_event, dbos, queue),
                        name=f"queue-worker-{name}",
                        daemon=True,
                    )
                    thread.start()
                    threads[name] = thread
            # Sliced: a stop is seen within a second (DBOS.destroy joins this thread).
            deadline = time.monotonic() + check_s
            while not _manager_wake.is_set() and (left := deadline - time.monotonic()) > 0:
                if stop_event.wait(timeout=min(1.0, left)):
                    break
            _manager_wake.clear()
        for thread in threads.values():
            thread.join(timeout=10.0)

    dbos_module.queue_thread = queue_thread  # type: ignore[attr-defined]  # DBOS.launch's


_manager_wake = threading.Event()


def wake_queue_manager() -> None:
    _manager_wake.set()


def dbos_instance() -> Any:
    from dbos._dbos import _get_dbos_instance

    return _get_dbos_instance()


def stop_background_threads() -> None:
    """Stop the queue workers and DBOS's other background threads (they check an event)."""
    for event in dbos_instance().background_thread_stop_events:
        event.set()
    _manager_wake.set()


def active_workflow_ids() -> list[str]:
    """Workflows executing in this process now."""
    ids: list[str] = dbos_instance()._active_workflows_set.activeList()
    return ids


def reenqueue(workflow_id: str, executor: str) -> bool:
    """Return one PENDING workflow of `executor` to its queue (DBOS's own recovery step, for
    exactly this id: never a live run beside it). False when it is not PENDING under
    `executor` any more (someone else recovered it first)."""
    from dbos._utils import INTERNAL_QUEUE_NAME

    done: bool = dbos_instance()._sys_db.reenqueue_for_recovery(
        workflow_id, [executor], INTERNAL_QUEUE_NAME
    )
    return done


def set_max_recovery_attempts(workflow: Callable[..., Any], attempts: int) -> None:
    """DBOS dead-letters a workflow dispatched more than `attempts` + 1 times (its
    `workflow_status.recovery_attempts`, which store/runs.py: hand_off adjusts)."""
    from dbos._registrations import get_func_info

    info = get_func_info(workflow)
    if info is None:
        raise RuntimeError(f"{workflow!r} is not a DBOS workflow")
    info.max_recovery_attempts = attempts


# ------------------------------------------------------------------ the enqueue row
# What DBOS's enqueue writes (dbos 3.4.0: `_core._assemble_workflow_status`, then
# `SystemDatabase._insert_workflow_status` and the `workflow_input` insert), written on the
# accept's own connection so that the run, its user message and its workflow commit together:
# no run is ever accepted without its workflow. The row's values come from DBOS's own
# `prepare_enqueued_workflow` (its serializer, its names); only the INSERT is ours.
# `created_at` orders a partition's runs (DBOS's claim takes the oldest): it is the clock at
# the statement, after the thread's lock, and never before a run still waiting in the
# partition, so the queue's order is the order of `threadgate.runs.seq`.
ENQUEUE_SQL = """
WITH s AS (
    INSERT INTO dbos.workflow_status (
        workflow_uuid, status, name, class_name, config_name, executor_id,
        application_version, application_id, authenticated_user, authenticated_roles,
        assumed_role, queue_name, recovery_attempts, workflow_timeout_ms,
        workflow_deadline_epoch_ms, deduplication_id, priority, serialization,
        queue_partition_key, parent_workflow_id, creator_xid, owner_xid, delay_until_epoch_ms,
        attributes, schedule_name, debounce_deadline_epoch_ms, is_debounced, application_name,
        created_at, updated_at)
    SELECT %(workflow_uuid)s, %(status)s, %(name)s, %(class_name)s, %(config_name)s,
        %(executor_id)s, %(app_version)s, %(app_id)s, %(authenticated_user)s,
        %(authenticated_roles)s, %(assumed_role)s, %(queue_name)s, 0, %(workflow_timeout_ms)s,
        %(workflow_deadline_epoch_ms)s, %(deduplication_id)s, %(priority)s, %(serialization)s,
        %(queue_partition_key)s, %(parent_workflow_id)s, %(creator_xid)s, NULL,
        %(delay_until_epoch_ms)s, %(attributes)s, %(schedule_name)s,
        %(debounce_deadline_epoch_ms)s, %(is_debounced)s, %(application_name)s, t.ms, t.ms
    FROM (SELECT greatest(
              (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
              (SELECT max(created_at) + 1 FROM dbos.workflow_status
               WHERE queue_name = %(queue_name)s AND queue_partition_key = %(queue_partition_key)s
                 AND status IN ('ENQUEUED', 'PENDING'))) AS ms) t
    ON CONFLICT (workflow_uuid) DO NOTHING
    RETURNING workflow_uuid)
INSERT INTO dbos.workflow_input (workflow_uuid, inputs)
SELECT workflow_uuid, %(inputs)s FROM s
ON CONFLICT (workflow_uuid) DO NOTHING
"""


def workflow_row(
    workflow: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    queue: str,
    workflow_id: str,
    partition: str,
    version: str | None,
) -> dict[str, Any]:
    """The values DBOS's enqueue of `workflow(*args)` would write (ENQUEUE_SQL's params)."""
    import json as _json
    import uuid

    from dbos._core import prepare_enqueued_workflow

    status: dict[str, Any] = dict(
        prepare_enqueued_workflow(
            dbos_instance(),
            workflow,
            args,
            {},
            queue_name=queue,
            workflow_id=workflow_id,
            queue_partition_key=partition,
        )
    )
    if version is not None:
        status["app_version"] = version
    if status.get("attributes") is not None:
        status["attributes"] = _json.dumps(status["attributes"])
    status["creator_xid"] = str(uuid.uuid4())
    return status


async def enqueue_in(conn: AsyncConnection[Any], row: dict[str, Any]) -> None:
    """Write the workflow's enqueue row on `conn` (in the caller's transaction). Idempotent:
    an existing workflow id is left as it is, as DBOS's enqueue does."""
    await conn.execute(ENQUEUE_SQL, row)


# ------------------------------------------------------------------ the claim
# DBOS's claim for a queue with partition_concurrency=1 (dbos 3.4.0:
# `SystemDatabase.start_queued_partitioned_workflows`, which the queue worker runs), as one
# statement on our asyncio pool instead of four transactions in a thread (queue row, version
# row, claim, status read-back). The same predicate, so that a tie between this claim and a
# DBOS queue worker breaks the same way: partitions walked by a loose index scan, a partition
# taken only when none of its workflows is PENDING, its head (priority, created_at,
# workflow_uuid) among this version's rows, the fixed set of heads locked SKIP LOCKED (never a
# LIMIT under SKIP LOCKED, which could slide past a locked head), the same guard re-checked on
# the row version it locks, and the same columns set. Two differences, both narrower: the
# queue's config is the one registered at start (checked once, `check_queue`), and rows
# without an application version are left to DBOS's worker (every run threadgate enqueues
# has one; adoption gives the version-less ones a version). It returns what dispatch needs
# (the status, inputs included) and what the run's first steps would otherwise read: whether
# any step output exists, whether runs wait behind it, and the run row's attempt and replays.
_ENQ = """w.queue_name = %(queue)s AND w.status = 'ENQUEUED'
          AND (w.application_name = %(app)s OR w.application_name IS NULL)"""
_GUARD = """w.status = 'ENQUEUED' AND w.queue_name = %(queue)s
          AND w.queue_partition_key IS NOT NULL AND w.application_version = %(version)s
          AND (w.application_name = %(app)s OR w.application_name IS NULL)"""
_ALL_PARTITIONS = f"""
    SELECT min(w.queue_partition_key) FROM dbos.workflow_status w
    WHERE {_ENQ} AND w.queue_partition_key IS NOT NULL
  UNION ALL
    SELECT (SELECT min(w.queue_partition_key) FROM dbos.workflow_status w
            WHERE {_ENQ} AND w.queue_partition_key > p.pk)
    FROM partitions p WHERE p.pk IS NOT NULL"""
_ONE_PARTITION = "SELECT %(partition)s::text"
CLAIM_SQL = """
WITH RECURSIVE partitions(pk) AS ({partitions}),
chosen AS (
    SELECT p.pk FROM partitions p
    WHERE p.pk IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM dbos.workflow_status x
                      WHERE x.queue_name = %(queue)s AND x.status = 'PENDING'
                        AND x.queue_partition_key IS NOT NULL AND x.queue_partition_key = p.pk)
    ORDER BY p.pk LIMIT 8192),
heads AS MATERIALIZED (
    SELECT h.workflow_uuid FROM chosen c
    CROSS JOIN LATERAL (
        SELECT w.workflow_uuid FROM dbos.workflow_status w
        WHERE {enq} AND w.queue_partition_key = c.pk AND w.application_version = %(version)s
        ORDER BY w.priority, w.created_at, w.workflow_uuid LIMIT 1) h),
locked AS MATERIALIZED (
    SELECT w.workflow_uuid FROM dbos.workflow_status w
    WHERE w.workflow_uuid IN (SELECT workflow_uuid FROM heads) AND {guard}
    FOR UPDATE OF w SKIP LOCKED),
claimed AS (
    UPDATE dbos.workflow_status w
    SET status = 'PENDING', owner_xid = %(owner)s, application_version = %(version)s,
        executor_id = %(executor)s, application_name = %(app)s,
        started_at_epoch_ms = (extract(epoch FROM now()) * 1000)::bigint,
        rate_limited = false, recovery_attempts = w.recovery_attempts + 1,
        updated_at = (extract(epoch FROM now()) * 1000)::bigint,
        workflow_deadline_epoch_ms = CASE
            WHEN w.workflow_timeout_ms IS NOT NULL AND w.workflow_deadline_epoch_ms IS NULL
            THEN CASE WHEN w.workflow_timeout_ms > %(max_bigint)s - %(start_ms)s
                      THEN %(max_bigint)s ELSE %(start_ms)s + w.workflow_timeout_ms END
            ELSE w.workflow_deadline_epoch_ms END
    FROM locked l
    WHERE w.workflow_uuid = l.workflow_uuid AND {guard}
    RETURNING w.*)
SELECT c.workflow_uuid, c.status, c.name, c.recovery_attempts, c.config_name, c.class_name,
       c.authenticated_user, c.authenticated_roles, c.assumed_role, c.queue_name,
       c.executor_id, c.created_at, c.updated_at, c.application_version, c.application_id,
       c.workflow_deadline_epoch_ms, c.workflow_timeout_ms, c.deduplication_id, c.priority,
       coalesce(i.inputs, c.inputs) AS inputs, c.queue_partition_key, c.forked_from,
       c.parent_workflow_id, c.started_at_epoch_ms, c.serialization, c.delay_until_epoch_ms,
       c.attributes, c.schedule_name, c.debounce_deadline_epoch_ms, c.is_debounced,
       c.application_name,
       EXISTS (SELECT 1 FROM dbos.operation_outputs o
               WHERE o.workflow_uuid = c.workflow_uuid) AS steps_recorded,
       EXISTS (SELECT 1 FROM dbos.workflow_status b
               WHERE b.queue_name = %(queue)s AND b.status = 'ENQUEUED'
                 AND b.queue_partition_key = c.queue_partition_key
                 AND b.workflow_uuid <> c.workflow_uuid) AS behind,
       r.attempt AS run_attempt, r.replays AS run_replays
FROM claimed c
LEFT JOIN dbos.workflow_input i ON i.workflow_uuid = c.workflow_uuid
LEFT JOIN threadgate.runs r ON r.run_id = c.workflow_uuid
ORDER BY c.queue_partition_key
"""
_CLAIM_ALL = CLAIM_SQL.format(partitions=_ALL_PARTITIONS, enq=_ENQ, guard=_GUARD)
_CLAIM_ONE = CLAIM_SQL.format(partitions=_ONE_PARTITION, enq=_ENQ, guard=_GUARD)
_MAX_BIGINT = 2**63 - 1


@dataclass(slots=True)
class Claimed:
    """A run this process just claimed: its workflow status as DBOS's dispatch takes it, and
    facts read in the claim's snapshot (exact: nothing else runs the workflow now)."""

    run_id: str
    thread_id: str
    status: Any  # dbos._sys_db.WorkflowStatusInternal (a TypedDict)
    steps_recorded: bool  # any step output of the workflow exists
    behind: bool  # runs of its thread wait behind it
    attempt: int  # threadgate.runs.attempt (0: the reply step never began)
    replays: int


def check_queue(row: dict[str, Any] | None) -> None:
    """The queue's row, as registered: the claim copies DBOS's predicate for exactly this
    configuration (dbos 3.4.0 asserts the same before its own partitioned claim)."""
    if row is None:
        raise RuntimeError("the thread queue is not registered")
    other = {
        k: row.get(k)
        for k in (
            "concurrency",
            "worker_concurrency",
            "rate_limit_max",
            "partition_rate_limit_max",
            "partition_worker_concurrency",
        )
        if row.get(k) is not None
    }
    if row.get("partition_concurrency") != 1 or not row.get("partition_queue") or other:
        raise RuntimeError(f"the thread queue's configuration changed: {row!r}")


async def queue_row(conn: AsyncConnection[Any], queue: str) -> dict[str, Any] | None:
    cur = await conn.execute("SELECT * FROM dbos.queues WHERE name = %s", (queue,))
    row: dict[str, Any] | None = await cur.fetchone()
    return row


async def claim(
    conn: AsyncConnection[Any],
    *,
    queue: str,
    executor: str,
    version: str,
    app: str,
    owner_xid: str,
    partition: str | None = None,
) -> list[Claimed]:
    """Claim the queue's startable runs for `executor` (one partition's head, or every
    partition's): one statement, one transaction, on `conn` (autocommit)."""
    params = {
        "queue": queue,
        "executor": executor,
        "version": version,
        "app": app,
        "owner": owner_xid,
        "partition": partition,
        "start_ms": int(time.time() * 1000),
        "max_bigint": _MAX_BIGINT,
    }
    cur = await conn.execute(_CLAIM_ALL if partition is None else _CLAIM_ONE, params)
    out = []
    for m in await cur.fetchall():
        status = {
            "workflow_uuid": m["workflow_uuid"],
            "status": m["status"],
            "name": m["name"],
            "recovery_attempts": m["recovery_attempts"],
            "config_name": m["config_name"],
            "class_name": m["class_name"],
            "authenticated_user": m["authenticated_user"],
            "authenticated_roles": m["authenticated_roles"],
            "assumed_role": m["assumed_role"],
            "queue_name": m["queue_name"],
            "executor_id": m["executor_id"],
            "created_at": m["created_at"],
            "updated_at": m["updated_at"],
            "app_version": m["application_version"],
            "app_id": m["application_id"],
            "workflow_deadline_epoch_ms": m["workflow_deadline_epoch_ms"],
            "workflow_timeout_ms": m["workflow_timeout_ms"],
            "deduplication_id": m["deduplication_id"],
            "priority": m["priority"],
            "inputs": m["inputs"],
            "queue_partition_key": m["queue_partition_key"],
            "forked_from": m["forked_from"],
            "parent_workflow_id": m["parent_workflow_id"],
            "started_at_epoch_ms": m["started_at_epoch_ms"],
            "serialization": m["serialization"],
            "delay_until_epoch_ms": m["delay_until_epoch_ms"],
            "attributes": m["attributes"],
            "schedule_name": m["schedule_name"],
            "debounce_deadline_epoch_ms": m["debounce_deadline_epoch_ms"],
            "is_debounced": bool(m["is_debounced"]),
            "application_name": m["application_name"],
            "shard_key": None,
        }
        out.append(
            Claimed(
                run_id=m["workflow_uuid"],
                thread_id=m["queue_partition_key"],
                status=status,
                steps_recorded=bool(m["steps_recorded"]),
                behind=bool(m["behind"]),
                attempt=int(m["run_attempt"] or 0),
                replays=int(m["run_replays"] or 0),
            )
        )
    return out


# ------------------------------------------------------------------ dispatch on the loop
# dbos 3.4.0's `execute_dequeued_workflow` (what its queue worker calls for each claimed
# workflow) starts an async workflow with `_background_event_loop.submit_coroutine`, which
# blocks its calling thread until the loop has created the task, and refuses to be called from
# the loop itself. `dispatch` calls it on the loop, with that one call made non-blocking for
# the duration (a context variable marks it): everything else (inputs, dead-lettering, the
# workflow's context, its task bookkeeping) stays DBOS's own code.
_on_loop: contextvars.ContextVar[bool] = contextvars.ContextVar("tg_dispatch", default=False)
_fresh: set[str] = set()  # workflows whose claim saw no step output: DBOS's checks are skipped


def _install(dbos: Any) -> None:
    bel = dbos._background_event_loop
    if getattr(bel, "_tg_installed", False):
        return
    blocking = bel.submit_coroutine

    def submit_coroutine(coro: Any) -> Any:
        if _on_loop.get():
            # A fresh context, as run_coroutine_threadsafe would give it: nothing of the
            # dispatching code's context (its SetWorkflowID) reaches the workflow.
            task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
            dbos._workflow_tasks.add(task)
            task.add_done_callback(dbos._workflow_tasks.discard)
            return None
        return blocking(coro)

    bel.submit_coroutine = submit_coroutine
    sys_db = dbos._sys_db
    checking = sys_db.check_operation_execution

    def check_operation_execution(
        workflow_id: str, function_id: int, function_name: str, **kw: Any
    ) -> Any:
        # Exact, not a guess: the claim saw no step output of this workflow, and only the
        # claim's owner can record one since (DBOS checks owner_xid on every step record).
        if workflow_id in _fresh:
            return None
        return checking(workflow_id, function_id, function_name, **kw)

    sys_db.check_operation_execution = check_operation_execution
    bel._tg_installed = True


async def dispatch(c: Claimed, owner_xid: str) -> None:
    """Start a claimed workflow as DBOS's queue worker would, on the running loop."""
    from dbos._core import execute_dequeued_workflow

    dbos = dbos_instance()
    _install(dbos)
    if not c.steps_recorded:
        _fresh.add(c.run_id)
    try:
        if _dead_letters(dbos, c.status):
            # DBOS moves it off the queue with a blocking write: not on the loop.
            await asyncio.to_thread(execute_dequeued_workflow, dbos, c.status, owner_xid)
            return
        token = _on_loop.set(True)
        try:
            execute_dequeued_workflow(dbos, c.status, owner_xid)
        finally:
            _on_loop.reset(token)
    except BaseException:
        _fresh.discard(c.run_id)
        raise


def new_owner_xid() -> str:
    """A claim's ownership token (DBOS writes one per claim into owner_xid)."""
    from dbos._utils import generate_uuid

    owner: str = generate_uuid()
    return owner


def forget(run_id: str) -> None:
    """The workflow's execution here ended: a later one checks its steps again."""
    _fresh.discard(run_id)


def _dead_letters(dbos: Any, status: dict[str, Any]) -> bool:
    """Whether execute_dequeued_workflow will dead-letter this dispatch (its own test)."""
    from dbos._registrations import get_func_info

    func = dbos._registry.workflow_info_map.get(status["name"])
    info = get_func_info(func) if func is not None else None
    attempts = status["recovery_attempts"]
    limit = info.max_recovery_attempts if info is not None else None
    return limit is not None and attempts is not None and attempts > limit + 1
