"""The DBOS internals threadgate relies on, each behind one small function (dbos==3.4.0).

DBOS's public API has no call for these: stopping its background threads without blocking the
event loop (drain), listing the workflows this process executes, re-enqueuing chosen PENDING
workflows (adoption), claiming a queue's startable workflows now (event-driven start), a
workflow's recovery bound set from settings, and slower polling of what we do not use. dbos is pinned; tests/unit/test_dbos_internals.py
fails loudly when an upgrade moves one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def quiet_background(seconds: float) -> None:
    """Before launch: DBOS's internal queue (its scheduler and `resume_workflow` use it; our
    runs never do) and its background jobs (DELAYED workflows and DBOS's own workflow
    timeouts, neither of which threadgate uses) poll every `seconds`, not every second: an
    idle pod should cost next to nothing."""
    from dbos import _workflow_commands

    _workflow_commands._BACKGROUND_JOBS_INTERVAL_SEC = seconds
    dbos_instance()._registry.get_internal_queue()._polling_interval_sec = seconds


def dbos_instance() -> Any:
    from dbos._dbos import _get_dbos_instance

    return _get_dbos_instance()


def stop_background_threads() -> None:
    """Stop the queue workers and DBOS's other background threads (they check an event)."""
    for event in dbos_instance().background_thread_stop_events:
        event.set()


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


def claim_and_start(queue_name: str) -> list[str]:
    """Claim and start the queue's startable runs on this executor (blocking: a thread).

    The very claim DBOS's queue worker runs for a queue with partition_concurrency=1 (so ties
    between claimers break the same way and one run per thread holds), then each claimed run
    is dispatched on its own, as the worker does: one that fails to dispatch is logged and
    the others still start, and it goes back to the queue (DBOS's worker would leave it
    PENDING under this executor until the next restart).
    """
    from dbos._core import execute_dequeued_workflow
    from dbos._utils import GlobalParams, generate_uuid

    dbos = dbos_instance()
    if getattr(dbos, "_destroyed", False) or not dbos._launched:
        return []
    queue = dbos._sys_db.get_queue(queue_name)
    if queue is None:
        return []
    owner_xid = generate_uuid()
    ids: list[str] = dbos._sys_db.start_queued_partitioned_workflows(
        queue, GlobalParams.executor_id, GlobalParams.app_version, owner_xid=owner_xid
    )
    if not ids:
        return []
    try:
        found = {s["workflow_uuid"]: s for s in dbos._sys_db.get_workflow_statuses(ids)}
    except Exception as exc:
        logger.warning("fast start: statuses of claimed runs unreadable: %r", exc)
        found = {}
    for workflow_id in ids:
        try:
            status = found.get(workflow_id) or dbos._sys_db.get_workflow_status(workflow_id)
            if status is None:
                raise LookupError("workflow status not found")
            execute_dequeued_workflow(dbos, status, owner_xid)
        except Exception as exc:
            logger.error(
                "fast start: claimed run not started, back to the queue: %r",
                exc,
                extra={"run_id": workflow_id},
            )
            try:
                reenqueue(workflow_id, GlobalParams.executor_id)
            except Exception as again:
                logger.error("re-enqueue failed: %r", again, extra={"run_id": workflow_id})
    return ids
