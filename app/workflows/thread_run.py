"""The durable workflow of one thread run: stream the reply, then store it and say `done`.

Step names are part of the recovery contract (a pinned application version replays them by
name): never rename `stream_reply` or `finish_run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from dbos import DBOS

from ..errors import ModelError, StreamUnavailable, TransientModelError
from ..models import ChunkSource, Prompt
from ..settings import Settings
from ..store.runs import PgRunStore, Run
from ..streams.buffer import AttemptBroken, StreamBuffer
from ..streams.events import chunk, done, run_started
from .stops import StopSignals

logger = logging.getLogger(__name__)

WORKFLOW_NAME = "thread_run"
QUEUE_NAME = "thread_runs"
STEP_NAMES = ("stream_reply", "finish_run")  # in order; renaming one strands PENDING runs


class Outcome(TypedDict):
    """What `stream_reply` checkpoints: everything `finish_run` needs, nothing recomputed."""

    status: str  # success | error | cancelled | interrupted
    attempt: int
    text: str
    error: dict[str, Any] | None


@dataclass(slots=True)
class RunDeps:
    settings: Settings
    store: PgRunStore
    buffer: StreamBuffer
    model: ChunkSource
    stops: StopSignals
    metrics: Any = None


_deps: RunDeps | None = None
_running: set[asyncio.Task[Any]] = set()  # tasks executing thread_run in this process


def bind(deps: RunDeps | None) -> None:
    """Give the workflow its pod's dependencies (DBOS workflows are module-level)."""
    global _deps
    _deps = deps


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
    try:
        outcome = await stream_reply(thread_id, run_id)
    except Exception as exc:
        # Never leave a run without a final status and a `done`: its thread would look stuck.
        logger.exception("reply step failed", extra=_log(run_id, thread_id, 0))
        outcome = Outcome(status="error", attempt=0, text="", error=_error("internal", repr(exc)))
    await finish_run(thread_id, run_id, outcome)
    return outcome["status"]


def _log(run_id: str, thread_id: str, attempt: int) -> dict[str, Any]:
    return {"thread_id": thread_id, "run_id": run_id, "attempt": attempt}


@DBOS.step(name="stream_reply")
async def stream_reply(thread_id: str, run_id: str) -> Outcome:
    """Purge the subject, publish `run_started` and the chunks, in one step: a replay (after a
    crash) or a retry (after a transient failure) is a new attempt that redoes all of it."""
    d = deps()
    retries = 0
    while True:
        run = await d.store.begin_attempt(run_id, d.settings.pod_name)
        if run is None:
            logger.error("run row missing", extra=_log(run_id, thread_id, 0))
            return Outcome(status="error", attempt=0, text="", error=_error("orphan", "no run row"))
        attempt = run.attempt
        log = _log(run_id, thread_id, attempt)
        kind = "started" if attempt == 1 else "retried" if retries else "replayed"
        logger.info("run attempt %s", kind, extra=log)
        if d.metrics is not None:
            d.metrics.attempt(attempt, retry=retries > 0)
        if run.stop_requested:
            return Outcome(status=run.stop_requested, attempt=attempt, text="", error=None)
        remaining = _remaining_s(d, run)
        try:
            async with asyncio.timeout(remaining), _stop_watch(d, run_id):
                return await _stream_attempt(d, run, attempt)
        except TimeoutError:
            logger.warning("run timed out", extra=log)
            return Outcome(
                status="error",
                attempt=attempt,
                text="",
                error=_error("timeout", f"the run exceeded {_timeout_s(d, run):.0f}s"),
            )
        except ModelError as exc:
            if not exc.transient:
                logger.warning("model failed permanently: %s", exc.message, extra=log)
                return Outcome(
                    status="error", attempt=attempt, text="", error=_error(exc.code, exc.message)
                )
            error = exc
        except (AttemptBroken, StreamUnavailable) as exc:
            error = TransientModelError(f"stream: {exc}")
        retries += 1
        if retries > d.settings.max_retries:
            logger.warning("retries exhausted: %s", error.message, extra=log)
            return Outcome(
                status="error",
                attempt=attempt,
                text="",
                error=_error("retries_exhausted", error.message),
            )
        delay = min(d.settings.retry_base_s * 2 ** (retries - 1), d.settings.retry_cap_s)
        logger.warning(
            "transient failure, retry %d in %.1fs: %s", retries, delay, error.message, extra=log
        )
        if await d.stops.wait(run_id, min(delay, max(_remaining_s(d, run), 0.0))):
            reason = d.stops.reason(run_id) or "cancelled"
            return Outcome(status=reason, attempt=attempt, text="", error=None)


def _timeout_s(d: RunDeps, run: Run) -> float:
    return float(run.timeout_s or d.settings.run_timeout_s)


def _remaining_s(d: RunDeps, run: Run) -> float:
    """Time left of the run's budget, counted from its first start (crashes included)."""
    started = run.started_at or datetime.now(UTC)
    return _timeout_s(d, run) - (datetime.now(UTC) - started).total_seconds()


@contextlib.asynccontextmanager
async def _stop_watch(d: RunDeps, run_id: str) -> AsyncIterator[None]:
    """Read the stop flag from Postgres now and then, in case a control message was missed."""

    async def poll() -> None:
        while True:
            await asyncio.sleep(d.settings.stop_poll_s)
            with contextlib.suppress(Exception):
                reason = await d.store.stop_requested(run_id)
                if reason:
                    d.stops.request(run_id, reason)

    task = asyncio.create_task(poll())
    try:
        yield
    finally:
        task.cancel()


async def _stream_attempt(d: RunDeps, run: Run, attempt: int) -> Outcome:
    thread_id, run_id = run.thread_id, run.run_id
    history = await d.store.history(thread_id, run.seq) if d.model.reads_history else []
    prompt = Prompt(
        messages=[{"role": m.role, "content": m.content} for m in history]
        + [{"role": "user", "content": run.input}],
        options=run.model_options,
        attempt=attempt,
    )
    _fault(d, "before_purge")
    await d.buffer.purge(thread_id)
    pub = d.buffer.publisher(thread_id, run_id, attempt)
    await pub.publish(run_started(run_id, attempt), "start")
    if d.settings.fault_point:
        await pub.flush()
        _fault(d, "after_start")
    parts: list[str] = []
    stop: str | None = None
    stream = d.model.stream(prompt)
    try:
        async for index, text in _aenumerate(stream):
            await pub.publish(chunk(run_id, attempt, index, text), index)
            parts.append(text)
            if d.metrics is not None:
                d.metrics.chunk()
                if index == 0 and attempt == 1:
                    d.metrics.first_chunk.observe(
                        (datetime.now(UTC) - run.created_at).total_seconds()
                    )
            if d.settings.fault_point == f"chunk:{index}":
                await pub.flush()
                _fault(d, f"chunk:{index}")
            stop = d.stops.reason(run_id)
            if stop:
                break
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    await pub.flush()
    _fault(d, "after_chunks")
    if stop:
        logger.info("run stopped: %s", stop, extra=_log(run_id, thread_id, attempt))
        return Outcome(status=stop, attempt=attempt, text="".join(parts), error=None)
    return Outcome(status="success", attempt=attempt, text="".join(parts), error=None)


async def _aenumerate(it: Any) -> Any:
    index = 0
    async for item in it:
        yield index, item
        index += 1


@DBOS.step(name="finish_run", retries_allowed=True, max_attempts=8, interval_seconds=0.5)
async def finish_run(thread_id: str, run_id: str, outcome: Outcome) -> None:
    """Store the reply and the final status, then publish `done`: `done` means durable."""
    d = deps()
    status = outcome["status"]
    reply: str | None = None
    reply_status = "complete"
    if status == "success":
        reply = outcome["text"]
    elif status == "interrupted" and outcome["text"]:
        reply, reply_status = outcome["text"], "interrupted"
    await d.store.finish(
        run_id,
        thread_id,
        status,  # type: ignore[arg-type]
        reply=reply,
        reply_status=reply_status,
        error=outcome["error"],
    )
    _fault(d, "after_store")
    attempt = outcome["attempt"]
    pub = d.buffer.publisher(thread_id, run_id, attempt)
    await pub.publish(done(run_id, attempt, status, outcome["error"]), "done")  # type: ignore[arg-type]
    await pub.flush()
    _fault(d, "after_done")
    d.stops.forget(run_id)
    logger.info("run finished: %s", status, extra=_log(run_id, thread_id, attempt))
    if d.metrics is not None:
        d.metrics.finished(status)


def _fault(d: RunDeps, point: str) -> None:
    """Die here, abruptly, if the crash tests asked for it (see Settings.fault_point)."""
    if d.settings.fault_point == point:
        logger.warning("fault point %s reached: exiting", point)
        logging.shutdown()
        os._exit(137)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}
