"""The durable workflow of one thread run: stream (and store) the reply, then say `done`.

Step names are part of the recovery contract (a pinned application version replays them by
name): never rename `stream_reply`. `finish_run` was a step until issue 29: the finish is
idempotent code now (its two effects were idempotent already), and a run recorded with it
replays under this version all the same (RETIRED_STEPS).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from dbos import DBOS

from .. import tracing
from ..settings import Settings
from ..sources import ReplySource
from ..store.runs import PgRunStore
from ..streams.buffer import StreamBuffer
from ..streams.events import DoneStatus, done
from .internals import set_max_recovery_attempts
from .stops import StopSignals

logger = logging.getLogger(__name__)

WORKFLOW_NAME = "thread_run"
QUEUE_NAME = "thread_runs"
STEP_NAMES = ("stream_reply",)  # in order; renaming one strands PENDING runs
RETIRED_STEPS = ("finish_run",)  # recorded by earlier versions after STEP_NAMES; now code


class Outcome(TypedDict, total=False):
    """What `stream_reply` checkpoints: how the run ended. Its reply is stored by the step
    itself (app/workflows/endings.py), not checkpointed a second time in DBOS's tables.

    `text` and `parts` are in outcomes an earlier version checkpointed (it stored the reply in
    `finish_run`): a run recovered across the upgrade still stores it from them.
    """

    status: str  # success | error | cancelled | interrupted
    attempt: int
    error: dict[str, Any] | None
    text: str
    parts: list[dict[str, Any]] | None


@dataclass(slots=True)
class RunDeps:
    settings: Settings
    store: PgRunStore
    buffer: StreamBuffer
    model: ReplySource
    stops: StopSignals
    metrics: Any = None
    # (thread_id, run_id): the run ended here, the thread's next run may start now
    run_ended: Callable[[str, str], None] | None = None
    # thread_id: a run waits behind the one ending here (the finish's statement said so)
    run_waits: Callable[[str], None] | None = None
    # Held by the one suspect replaying on this pod (app/workflows/attempts.py: _alone).
    alone: asyncio.Lock = field(default_factory=asyncio.Lock)


_deps: RunDeps | None = None
_running: set[asyncio.Task[Any]] = set()  # tasks executing thread_run in this process


def bind(deps: RunDeps | None) -> None:
    """Give the workflow its pod's dependencies (DBOS workflows are module-level)."""
    global _deps
    _deps = deps
    if deps is not None:
        # threadgate counts crashes itself (`runs.replays`, THREADGATE_MAX_REPLAYS) and ends a
        # crash-looping run with its `done` before the thread moves on. DBOS's dispatch bound
        # stays as a backstop one crash later, for pods that die before a run begins an
        # attempt (threadgate never sees those); hand-offs are taken off its count
        # (store/runs.py: hand_off), so that a run drained any number of times is never
        # dead-lettered.
        set_max_recovery_attempts(thread_run, deps.settings.max_replays + 1)


def deps() -> RunDeps:
    if _deps is None:
        raise RuntimeError("thread_run used before the app bound its dependencies")
    return _deps


def running_tasks() -> list[asyncio.Task[Any]]:
    """The tasks executing runs here: a drain that times out cancels them (they stay PENDING)."""
    return [t for t in _running if not t.done()]


@DBOS.workflow(name=WORKFLOW_NAME)
async def thread_run(thread_id: str, run_id: str) -> str:
    task = asyncio.current_task()
    if task is not None:
        _running.add(task)
        task.add_done_callback(_running.discard)
        # Once the task is done DBOS has recorded the outcome and freed the partition.
        task.add_done_callback(functools.partial(_ended, thread_id, run_id))
    try:
        outcome = await stream_reply(thread_id, run_id)
    except Exception as exc:
        # Never leave a run without a final status and a `done`: its thread would look stuck.
        logger.exception("reply step failed", extra=log_fields(run_id, thread_id, 0))
        outcome = await end_failed_step(thread_id, run_id, exc)
    await finish(thread_id, run_id, outcome)
    return outcome["status"]


def _ended(thread_id: str, run_id: str, task: asyncio.Task[Any]) -> None:
    if _deps is not None and _deps.run_ended is not None:
        _deps.run_ended(thread_id, run_id)


def log_fields(run_id: str, thread_id: str, attempt: int) -> dict[str, Any]:
    return {"thread_id": thread_id, "run_id": run_id, "attempt": attempt}


@DBOS.step(name="stream_reply")
async def stream_reply(thread_id: str, run_id: str) -> Outcome:
    """Every attempt of the reply (app/workflows/attempts.py): a replay after a crash or a
    retry after a transient failure continues the reply from the parts already in the stream,
    or regenerates it (purge, `reset`) when the source cannot continue. Stores the reply."""
    from .attempts import reply

    return await reply(deps(), thread_id, run_id)


async def end_failed_step(thread_id: str, run_id: str, exc: BaseException) -> Outcome:
    """The reply step failed unexpectedly: end the run storing what its clients hold."""
    from .endings import end_failed

    try:
        return await end_failed(deps(), thread_id, run_id, exc)
    except Exception:
        logger.exception("ending a failed run failed", extra=log_fields(run_id, thread_id, 0))
        return Outcome(status="error", attempt=0, error=error("internal", type(exc).__name__))


async def finish(thread_id: str, run_id: str, outcome: Outcome) -> None:
    """The final status, then `done`: `done` means the reply and the status are durable, and
    it is published before the workflow ends (so before the thread's next run may start).

    Code of the workflow, not a step (a step's checkpoint costs two transactions): both
    effects are idempotent (the status update; `done` has a fixed message id), so a recovery
    that runs it again changes nothing. An outage of PostgreSQL or NATS is waited out, however
    long: a bounded retry would end the workflow with the run row still `running` and no `done`.
    """
    from .endings import patiently

    d = deps()
    tracing.finishing(run_id)
    attempt = outcome.get("attempt", 0)
    log = log_fields(run_id, thread_id, attempt)
    status: DoneStatus = outcome["status"]  # type: ignore[assignment]
    if "text" in outcome:
        await patiently(
            d, "storing the reply", lambda: _store_checkpointed(d, run_id, thread_id, outcome), log
        )
    waits = await patiently(
        d, "finishing", lambda: d.store.finish(run_id, status, error=outcome.get("error")), log
    )
    if waits and d.run_waits is not None:
        d.run_waits(thread_id)  # its end claims the thread's next run at once
    fault(d, "after_store", thread_id)

    async def publish() -> None:
        pub = d.buffer.publisher(thread_id, run_id, attempt)
        await pub.publish(done(run_id, attempt, status, outcome.get("error")), "done")
        await pub.flush()

    await patiently(d, "publishing done", publish, log)
    fault(d, "after_done", thread_id)
    logger.info("run finished: %s", status, extra=log)
    tracing.finished(run_id, status)
    if d.metrics is not None:
        d.metrics.finished(status)


async def _store_checkpointed(d: RunDeps, run_id: str, thread_id: str, outcome: Outcome) -> None:
    """A reply an earlier version checkpointed in its outcome (it stored it here)."""
    status = outcome["status"]
    text = outcome.get("text") or ""
    if status == "success" or (status == "interrupted" and text):
        parts: list[Any] = [
            p["text"] if p["type"] == "text" else (p["name"], p.get("payload"))
            for p in outcome.get("parts") or [{"type": "text", "text": text}]
        ]
        message_status = "complete" if status == "success" else status
        await d.store.store_reply(
            run_id, thread_id, outcome.get("attempt", 0), parts, message_status
        )


def is_transient(exc: BaseException) -> bool:
    """An outage of PostgreSQL or NATS (or a publish that lost its order): worth waiting out."""
    import psycopg
    from psycopg_pool import PoolTimeout

    from ..errors import StreamUnavailable
    from ..streams.buffer import AttemptBroken

    # Not psycopg.Error at large: a programming error would be retried for ever.
    return isinstance(
        exc,
        psycopg.OperationalError
        | psycopg.InterfaceError
        | PoolTimeout
        | StreamUnavailable
        | AttemptBroken
        | OSError,
    )


def fault(d: RunDeps, point: str, thread_id: str) -> None:
    """Die here, abruptly, if the crash tests asked for it (see Settings.fault_point)."""
    s = d.settings
    if s.fault_point == point and (not s.fault_thread or s.fault_thread == thread_id):
        logger.warning("fault point %s reached: exiting", point)
        logging.shutdown()
        os._exit(137)


def error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}
