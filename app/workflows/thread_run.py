"""The durable workflow of one thread run: stream the reply, then store it and say `done`.

Step names are part of the recovery contract (a pinned application version replays them by
name): never rename `stream_reply` or `finish_run`.
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

from ..settings import Settings
from ..sources import ReplySource
from ..store.runs import PgRunStore
from ..streams.buffer import StreamBuffer
from ..streams.events import done
from .internals import set_max_recovery_attempts
from .stops import StopSignals

logger = logging.getLogger(__name__)

WORKFLOW_NAME = "thread_run"
QUEUE_NAME = "thread_runs"
STEP_NAMES = ("stream_reply", "finish_run")  # in order; renaming one strands PENDING runs


class Outcome(TypedDict, total=False):
    """What `stream_reply` checkpoints: everything `finish_run` needs, nothing recomputed.

    `parts` (the reply's ordered parts when it has data events) is absent from outcomes an
    earlier version checkpointed.
    """

    status: str  # success | error | cancelled | interrupted
    attempt: int
    text: str
    error: dict[str, Any] | None
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
    # Held by the one suspect replaying on this pod (app/workflows/attempts.py: _alone).
    alone: asyncio.Lock = field(default_factory=asyncio.Lock)


_deps: RunDeps | None = None
_running: set[asyncio.Task[Any]] = set()  # tasks executing thread_run in this process


def bind(deps: RunDeps | None) -> None:
    """Give the workflow its pod's dependencies (DBOS workflows are module-level)."""
    global _deps
    _deps = deps
    if deps is not None:
        # DBOS dead-letters a workflow dispatched this often; ours ends a crash-looping run
        # first (after max_replays replays), DBOS is the backstop for crashes outside it.
        set_max_recovery_attempts(thread_run, deps.settings.max_replays + 2)


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
        outcome = Outcome(
            status="error", attempt=0, text="", error=error("internal", type(exc).__name__)
        )
    await finish_run(thread_id, run_id, outcome)
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
    or regenerates it (purge, `reset`) when the source cannot continue."""
    from .attempts import reply

    return await reply(deps(), thread_id, run_id)


@DBOS.step(name="finish_run")
async def finish_run(thread_id: str, run_id: str, outcome: Outcome) -> None:
    """Store the reply and the final status, then publish `done`: `done` means durable.

    Both effects are idempotent (the reply is stored once, `done` has a fixed message id), so
    an outage of PostgreSQL or NATS is waited out, however long: a bounded retry would end the
    workflow with the run row still `running` and no `done`.
    """
    d = deps()
    delay = 0.2
    while True:
        try:
            await _finish(d, thread_id, run_id, outcome)
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            logger.warning(
                "finishing failed, retrying in %.1fs: %r",
                delay,
                exc,
                extra=log_fields(run_id, thread_id, outcome.get("attempt", 0)),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, d.settings.retry_cap_s or 5.0, 5.0)


async def _finish(d: RunDeps, thread_id: str, run_id: str, outcome: Outcome) -> None:
    status = outcome["status"]
    text = outcome.get("text", "")
    reply: str | None = None
    reply_status = "complete"
    if status == "success":
        reply = text
    elif status == "interrupted" and text:
        reply, reply_status = text, "interrupted"
    await d.store.finish(
        run_id,
        thread_id,
        status,  # type: ignore[arg-type]
        reply=reply,
        reply_status=reply_status,
        parts=outcome.get("parts") if reply is not None else None,
        error=outcome.get("error"),
    )
    fault(d, "after_store", thread_id)
    attempt = outcome.get("attempt", 0)
    pub = d.buffer.publisher(thread_id, run_id, attempt)
    await pub.publish(done(run_id, attempt, status, outcome.get("error")), "done")  # type: ignore[arg-type]
    await pub.flush()
    fault(d, "after_done", thread_id)
    logger.info("run finished: %s", status, extra=log_fields(run_id, thread_id, attempt))
    if d.metrics is not None:
        d.metrics.finished(status)


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
