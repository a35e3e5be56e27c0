"""The DBOS internals behind threadgate.workflows.internals still exist in the installed dbos."""

from __future__ import annotations

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
        "start_queued_partitioned_workflows": ["queue", "executor_id", "app_version"],
        "get_workflow_statuses": ["workflow_ids"],
        "get_workflow_status": ["workflow_uuid"],
        "get_queue": ["name"],
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


def test_fast_start_starts_each_claimed_run_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure reading the claimed runs' statuses, or starting one of them, used to strand
    every run of the claim (PENDING under this pod until its next restart)."""
    from types import SimpleNamespace

    import dbos._core

    started: list[str] = []
    back: list[str] = []

    class SysDb:
        def get_queue(self, name: str) -> object:
            return object()

        def start_queued_partitioned_workflows(self, *args: object, **kw: object) -> list[str]:
            return ["a", "b", "c"]

        def get_workflow_statuses(self, ids: list[str]) -> list[dict[str, str]]:
            raise RuntimeError("the batch read failed")

        def get_workflow_status(self, workflow_id: str) -> dict[str, str]:
            return {"workflow_uuid": workflow_id}

        def reenqueue_for_recovery(self, workflow_id: str, executors: list[str], q: str) -> bool:
            back.append(workflow_id)
            return True

    def execute(dbos: object, status: dict[str, str], owner_xid: str) -> None:
        if status["workflow_uuid"] == "b":
            raise RuntimeError("b failed to start")
        started.append(status["workflow_uuid"])

    fake = SimpleNamespace(_launched=True, _destroyed=False, _sys_db=SysDb())
    monkeypatch.setattr(internals, "dbos_instance", lambda: fake)
    monkeypatch.setattr(dbos._core, "execute_dequeued_workflow", execute)
    assert internals.claim_and_start("thread_runs") == ["a", "b", "c"]
    assert started == ["a", "c"] and back == ["b"]


def test_dbos_bounds_dispatches_by_the_recovery_attempts_column() -> None:
    """store/runs.py: hand_off takes a hand-off's dispatch off `workflow_status.
    recovery_attempts`, the count DBOS dead-letters a workflow by (dbos==3.4.0)."""
    import dbos._core as core
    from dbos._schemas.system_database import SystemSchema

    assert "recovery_attempts" in SystemSchema.workflow_status.c
    source = inspect.getsource(core)
    assert "recovery_attempts > fi.max_recovery_attempts + 1" in source
