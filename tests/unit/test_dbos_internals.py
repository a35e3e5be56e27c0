"""The DBOS internals behind threadgate.workflows.internals still exist in the installed dbos."""

from __future__ import annotations

import hashlib
import inspect
from importlib.metadata import version

import pytest
from dbos._core import ActiveWorkflowById, execute_dequeued_workflow
from dbos._dbos import DBOS, _get_dbos_instance
from dbos._registrations import DBOSFuncInfo, get_func_info
from dbos._sys_db import SystemDatabase
from dbos._utils import INTERNAL_QUEUE_NAME, GlobalParams, generate_uuid
from threadgate.workflows import internals
from threadgate.workflows.thread_run import thread_run

pytestmark = pytest.mark.unit


def test_dbos_is_the_pinned_version() -> None:
    assert version("dbos") == "3.4.0", "re-check app/workflows/internals.py against the new dbos"


def test_system_database_calls_keep_their_signatures() -> None:
    for name, params in {
        "reenqueue_for_recovery": ["workflow_id", "executor_ids", "recovery_queue_name"],
        "get_pending_workflows": ["executor_id", "app_version"],
        "check_operation_execution": ["workflow_id", "function_id", "function_name"],
    }.items():
        got = list(inspect.signature(getattr(SystemDatabase, name)).parameters)[1:]
        assert got[: len(params)] == params, (name, got)


def test_process_state_is_where_we_read_it() -> None:
    assert callable(_get_dbos_instance) and callable(execute_dequeued_workflow)
    assert "activeList" in dir(ActiveWorkflowById)
    init = inspect.getsource(DBOS.__init__)
    assert "background_thread_stop_events" in init and "_active_workflows_set" in init
    assert INTERNAL_QUEUE_NAME and callable(generate_uuid) and hasattr(GlobalParams, "executor_id")


def test_what_quiet_background_slows_is_where_it_sets_it() -> None:
    import dbos._workflow_commands as commands
    from dbos._queue import Queue

    assert isinstance(commands._BACKGROUND_JOBS_INTERVAL_SEC, float)
    assert "_BACKGROUND_JOBS_INTERVAL_SEC" in inspect.getsource(commands.background_jobs_thread)
    assert "_polling_interval_sec" in inspect.getsource(Queue.__init__)
    from dbos._dbos import DBOSRegistry

    assert callable(DBOSRegistry.get_internal_queue)


def test_recovery_bound_is_a_field_of_the_workflow_info() -> None:
    info = get_func_info(thread_run)
    assert isinstance(info, DBOSFuncInfo)
    before = info.max_recovery_attempts
    try:
        internals.set_max_recovery_attempts(thread_run, 7)
        assert info.max_recovery_attempts == 7
    finally:
        info.max_recovery_attempts = before


def _digest(obj: object) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


# What threadgate copies or leans on, by the digest of its source in dbos 3.4.0. A change in
# any of them is a change threadgate must follow: re-read it, port it to the copy named, then
# update the digest.
COPIED = {
    # internals.CLAIM_SQL is this claim as one statement: predicate, order, locking, columns.
    "SystemDatabase.start_queued_partitioned_workflows": "see CLAIM_SQL",
    # internals.ENQUEUE_SQL writes the columns this insert writes.
    "SystemDatabase._insert_workflow_status": "see ENQUEUE_SQL",
    # internals.dispatch calls it on the loop (its submit_coroutine made non-blocking).
    "execute_dequeued_workflow": "see dispatch",
    "BackgroundEventLoop.submit_coroutine": "see _install",
    # internals.workflow_row takes its values from it.
    "prepare_enqueued_workflow": "see workflow_row",
    # The step checks internals skips go through check_operation_execution, and each step
    # record checks owner_xid (what makes the skip exact).
    "SystemDatabase._record_operation_result_txn": "owner check",
}
DIGESTS = {
    "SystemDatabase.start_queued_partitioned_workflows": "49ea7aca87a15355",
    "SystemDatabase._insert_workflow_status": "f09e61856122bfb9",
    "execute_dequeued_workflow": "2434b435322ba8bb",
    "BackgroundEventLoop.submit_coroutine": "099669fb441ee00f",
    "prepare_enqueued_workflow": "92fe9f2543b20b2f",
    "SystemDatabase._record_operation_result_txn": "c3ddd7275cd9a49b",
}


def _copied_objects() -> dict[str, object]:
    from dbos._core import prepare_enqueued_workflow
    from dbos._event_loop import BackgroundEventLoop

    return {
        "SystemDatabase.start_queued_partitioned_workflows": (
            SystemDatabase.start_queued_partitioned_workflows
        ),
        "SystemDatabase._insert_workflow_status": SystemDatabase._insert_workflow_status,
        "execute_dequeued_workflow": execute_dequeued_workflow,
        "BackgroundEventLoop.submit_coroutine": BackgroundEventLoop.submit_coroutine,
        "prepare_enqueued_workflow": prepare_enqueued_workflow,
        "SystemDatabase._record_operation_result_txn": (
            SystemDatabase._record_operation_result_txn
        ),
    }


def test_what_threadgate_copies_from_dbos_is_unchanged() -> None:
    got = {name: _digest(obj) for name, obj in _copied_objects().items()}
    assert got == DIGESTS, "dbos changed code threadgate copies (see COPIED): re-check it"


def test_the_hooks_dispatch_installs_find_their_targets() -> None:
    """dispatch makes DBOS's submit_coroutine non-blocking on the loop and skips step checks:
    both are attributes of objects DBOS builds at construction."""
    init = inspect.getsource(DBOS.__init__)
    assert "_background_event_loop" in init and "_workflow_tasks" in init
    from dbos._core import invoke_step

    step = inspect.getsource(invoke_step)
    assert "dbos._sys_db.check_operation_execution(" in step
    assert "_check_owner_txn" in inspect.getsource(SystemDatabase._record_operation_result_txn)
    dispatch = inspect.getsource(execute_dequeued_workflow)
    assert "dbos._background_event_loop.submit_coroutine(" in dispatch
    assert "dead_letter_workflows" in dispatch and "max_recovery_attempts + 1" in dispatch


def test_dbos_bounds_dispatches_by_the_recovery_attempts_column() -> None:
    """store/runs.py: hand_off takes a hand-off's dispatch off `workflow_status.
    recovery_attempts`, the count DBOS dead-letters a workflow by (dbos==3.4.0)."""
    import dbos._core as core
    from dbos._schemas.system_database import SystemSchema

    assert "recovery_attempts" in SystemSchema.workflow_status.c
    source = inspect.getsource(core)
    assert "recovery_attempts > fi.max_recovery_attempts + 1" in source
