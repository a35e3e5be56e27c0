"""The attempts of one run's reply: begin, continue or regenerate, stream, stop, retry.

An attempt is the unit of retry. Its number comes from a crash-proof counter in PostgreSQL and
goes into every message id. A later attempt (a replay after a crash, a retry after a transient
failure) reads the parts already in the thread's subject and continues after them when the
source can (`run_started.resume_from`); otherwise, or when they cannot be read, it purges and
regenerates (clients that saw parts get a `reset`). A run whose attempts keep killing their
pods ends `crashed_repeatedly` after `max_replays` replays, without calling the model again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from .. import tracing
from ..errors import InvalidDataEvent, ModelError, PermanentModelError
from ..sources import ContinuationRefused, Data, Part, Prompt, continues, reads_history
from ..store.runs import Run
from ..streams.events import Event, chunk, data, run_started
from .endings import Held, end, read_prefix
from .stops import Watch
from .thread_run import Outcome, RunDeps, error, fault, is_transient, log_fields

logger = logging.getLogger(__name__)

DATA_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
SUSPECT_REPLAYS = 1  # a run replayed this many times already replays alone (`_alone`)


async def reply(d: RunDeps, thread_id: str, run_id: str) -> Outcome:
    """Attempts until one ends the run (success, error, a stop, the time budget). However it
    ends, its reply (the parts its clients hold) is stored before this returns."""
    fault(d, "before_begin", thread_id)
    watch = d.stops.watch(run_id)
    try:
        async with _alone(d, thread_id, run_id, watch) as stopped:
            if stopped:
                return Outcome(status=watch.reason or "cancelled", attempt=0, error=None)
            return await _attempts(d, thread_id, run_id, watch)
    finally:
        d.stops.forget(run_id)


@contextlib.asynccontextmanager
async def _alone(d: RunDeps, thread_id: str, run_id: str, watch: Watch) -> AsyncIterator[bool]:
    """A run whose pod already died under it twice (a suspect) replays alone on its pod.

    A crash replays every run the pod held, and each one's replay counts: a run that kills its
    pod would take the runs beside it to `crashed_repeatedly` too. The first replay after a
    crash is concurrent (one crash is usually an OOM or a node, not a run); from the second,
    suspects take turns, so a poison run dies alone and the others finish. A suspect waiting
    its turn is marked handed off: a crash meanwhile is not its own. Yields True if the run was
    asked to stop while it waited.
    """
    from .starts import claimed

    facts = claimed(run_id)  # what this process's claim saw (None: DBOS's worker, recovery)
    if facts is not None and (facts.attempt == 0 or facts.replays < SUSPECT_REPLAYS):
        # Exact: the claim made the workflow ours; only an execution of it changes these.
        yield False
        return
    try:
        run = await d.store.get_run(thread_id, run_id)
    except Exception as exc:  # the attempts wait out an outage; a suspect then runs beside others
        if not is_transient(exc):
            raise
        run = None
    if run is None or run.attempt == 0 or run.replays < SUSPECT_REPLAYS:
        yield False
        return
    log = log_fields(run_id, thread_id, run.attempt)
    waits = d.alone.locked()
    if waits:
        logger.warning(
            "run replayed after %d crashes waits to replay alone", run.replays, extra=log
        )
        with contextlib.suppress(Exception):  # best effort: at worst the crash counts
            await d.store.hand_off([run_id])
    turn = asyncio.ensure_future(d.alone.acquire())
    stop = asyncio.ensure_future(watch.event.wait())
    try:
        await asyncio.wait({turn, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not turn.done():
            turn.cancel()
    if not turn.cancelled() and turn.done() and turn.exception() is None:
        try:
            if waits:  # its turn: a crash is its own again
                with contextlib.suppress(Exception):  # if not, DBOS's recovery limit is left
                    await d.store.hand_off([run_id], handed=False)
            yield watch.event.is_set()
        finally:
            d.alone.release()
    else:
        yield True


async def _attempts(d: RunDeps, thread_id: str, run_id: str, watch: Watch) -> Outcome:
    s = d.settings
    kind = "first"  # of this execution of the step
    model_retries = outage_retries = 0
    may_continue = continues(d.model)
    begin = uuid.uuid4().hex  # this begin: sent again as is if its answer was lost
    while True:
        try:
            run = await d.store.begin_attempt(
                run_id, s.pod_name, kind=kind, timeout_s=s.run_timeout_s, begin=begin
            )
        except Exception as exc:
            if not is_transient(exc):
                raise
            outage_retries += 1
            delay = _backoff(d, outage_retries)
            logger.warning(
                "cannot begin an attempt, retrying in %.1fs: %r",
                delay,
                exc,
                extra=log_fields(run_id, thread_id, 0),
            )
            if await d.stops.wait(run_id, delay):
                return Outcome(status=watch.reason or "cancelled", attempt=0, error=None)
            continue
        replayed = kind == "first" and run is not None and run.attempt > 1
        kind, begin = "retry", uuid.uuid4().hex
        if run is None:
            logger.error("run row missing", extra=log_fields(run_id, thread_id, 0))
            return Outcome(status="error", attempt=0, error=error("orphan", "no run row"))
        attempt = run.attempt
        log = log_fields(run_id, thread_id, attempt)
        logger.info(
            "run attempt %s",
            "started" if attempt == 1 else "replayed" if replayed else "retried",
            extra=log,
        )
        if d.metrics is not None:
            d.metrics.attempt(attempt, retry=not replayed and attempt > 1)
        await tracing.attempt_began(d.store.db, run, replayed)
        if replayed and run.replays > s.max_replays:
            logger.error("run replayed %d times after crashes: ending it", run.replays, extra=log)
            return await end(
                d,
                run,
                attempt,
                None,
                "error",
                error(
                    "crashed_repeatedly",
                    f"the run's pod died {run.replays} times while running it",
                ),
            )
        if run.stop_requested:
            return await end(d, run, attempt, None, run.stop_requested, None)
        remaining = run.remaining_s if run.remaining_s is not None else s.run_timeout_s
        if remaining <= 0:
            return await end(d, run, attempt, None, "error", _timed_out(d, run))
        held = Held()
        try:
            async with asyncio.timeout(remaining) as budget, _polling(d, run, attempt, watch):
                status = await _stream_attempt(d, run, attempt, may_continue, watch, held)
            return await end(d, run, attempt, held.reply(), status, None)
        except TimeoutError:
            if not budget.expired():
                raise
            logger.warning("run timed out", extra=log)
            return await end(d, run, attempt, held.reply(), "error", _timed_out(d, run))
        except ModelError as exc:
            if not exc.transient:
                logger.warning("model failed permanently: %s", exc.message, extra=log)
                return await end(
                    d, run, attempt, held.reply(), "error", error(exc.code, exc.message)
                )
            model_retries += 1
            if model_retries > s.max_retries:
                logger.warning("retries exhausted: %s", exc.message, extra=log)
                return await end(
                    d, run, attempt, held.reply(), "error", error("retries_exhausted", exc.message)
                )
            delay = _backoff(d, model_retries)
            cause: Exception = exc
        except Exception as exc:
            if not is_transient(exc):
                raise
            # PostgreSQL or NATS away: waited out within the run's time budget, not counted
            # against the model's retries.
            outage_retries += 1
            delay = _backoff(d, outage_retries)
            cause = exc
        logger.warning("attempt failed, next in %.1fs: %r", delay, cause, extra=log)
        if await d.stops.wait(run_id, delay):
            return await end(d, run, attempt, held.reply(), watch.reason or "cancelled", None)


def _backoff(d: RunDeps, n: int) -> float:
    return float(min(d.settings.retry_base_s * 2 ** min(n - 1, 30), d.settings.retry_cap_s))


def _timed_out(d: RunDeps, run: Run) -> dict[str, Any]:
    limit = run.timeout_s or d.settings.run_timeout_s
    return error("timeout", f"the run exceeded {limit:.0f}s")


@contextlib.asynccontextmanager
async def _polling(d: RunDeps, run: Run, attempt: int, watch: Watch) -> AsyncIterator[None]:
    """Now and then read the run's row: a stop whose control message was missed, or a newer
    attempt begun by another process (after a database outage a survivor may have adopted
    this pod's runs): then this execution stops at once, recording nothing. One read per
    process for all its runs (stops.StopPoller)."""
    task = asyncio.current_task()

    def heard(reason: str | None, newest: int) -> bool:
        if newest > attempt:
            logger.error(
                "attempt %d began elsewhere: this execution stops",
                newest,
                extra=log_fields(run.run_id, run.thread_id, attempt),
            )
            watch.superseded = True
            if task is not None:
                task.cancel()
            return False
        if reason:
            d.stops.request(run.run_id, reason)
        return True

    poller = d.stops.polling(d.store.runs_state, d.settings.stop_poll_s)
    with poller.polled(run.run_id, heard):
        yield


def _part_of(ev: Event) -> Part:
    return ev.text or "" if ev.type == "chunk" else Data(ev.name or "", ev.data)


async def _stream_attempt(
    d: RunDeps, run: Run, attempt: int, may_continue: bool, watch: Watch, held: Held
) -> str:
    """One attempt: continue after the parts in the subject, or regenerate (purge); then
    stream the source's parts. `held` has the attempt's reply as it grows (so an attempt that
    fails still says what its clients hold). The status it ends with."""
    s = d.settings
    thread_id, run_id = run.thread_id, run.run_id
    history = await d.store.history(thread_id, run.seq) if reads_history(d.model) else []
    prefix = await read_prefix(d, run) if attempt > 1 and may_continue else []
    prompt = Prompt(
        messages=[{"role": m.role, "content": m.content} for m in history]
        + [{"role": "user", "content": run.input}],
        options=run.model_options,
        attempt=attempt,
        prefix_parts=tuple(_part_of(e) for e in prefix),
    )
    task = asyncio.current_task()
    stream: AsyncIterator[Part] | None = None
    pending: Part | object = _END  # a continuation's first part, read before it is announced
    failed: Exception | None = None  # ... or the failure that came instead
    stop: str | None = None
    if prefix:
        # Asked first, so that a source that refuses to continue is known before anything is
        # announced: the attempt then regenerates, and its record says so (not resume_from).
        stream = _open(d, prompt)
        try:
            pending = await _pull(stream, watch, task)
        except ContinuationRefused as exc:
            logger.warning(
                "source refused to continue, regenerating: %s",
                exc.message,
                extra=log_fields(run_id, thread_id, attempt),
            )
            await _close(stream)
            stream, prefix = None, []
            prompt = dataclasses.replace(prompt, prefix_parts=())
        except _Stopped:
            stop = watch.reason
        except Exception as exc:  # the attempt still says what it keeps, then fails
            failed = exc
    kept = len(prefix)
    if attempt > 1:  # a first attempt's record says it already (begin_attempt)
        await d.store.record_kept(run_id, attempt, kept)
    if not kept:
        fault(d, "before_purge", thread_id)
        await d.buffer.purge(thread_id)
    pub = d.buffer.publisher(thread_id, run_id, attempt)
    await pub.publish(run_started(run_id, attempt, kept or None, s.pod_name, run.seq), "start")
    held.announced = True
    if s.fault_point:
        await pub.flush()
        fault(d, "after_start", thread_id)
    held.parts = list(prefix)
    index = kept
    if failed is not None:
        await _close(stream)
        raise failed
    if stream is None:
        stream = _open(d, prompt)
    try:
        while not stop:
            if pending is not _END:
                item, pending = pending, _END
            else:
                try:
                    item = await _pull(stream, watch, task)
                except _Stopped:
                    stop = watch.reason
                    break
                if item is _END:
                    break
            assert isinstance(item, str | Data)
            # Under load the publisher holds a chunk back and merges the text deltas that
            # follow into it (streams/publisher.py, coalescing): that chunk, already held,
            # grows; a merged delta takes no event and no index of its own.
            if isinstance(item, str) and pub.merge(item):
                merged = True
            else:
                ev = _event(d, run_id, attempt, index, item)
                merged = await pub.part(ev)
                if not merged:
                    held.parts.append(ev)
            tracing.chunk(run_id)
            if d.metrics is not None:
                d.metrics.chunk()
                if index == 0 and attempt == 1 and not merged:
                    d.metrics.first_chunk.observe(
                        (datetime.now(UTC) - run.created_at).total_seconds()
                    )
            if not merged:
                if s.fault_point:
                    await _faults(d, pub, thread_id, index, index - kept)
                index += 1
            stop = watch.reason
    finally:
        await _close(stream)
    await pub.flush()
    fault(d, "after_chunks", thread_id)
    if stop:
        logger.info("run stopped: %s", stop, extra=log_fields(run_id, thread_id, attempt))
    return stop or "success"


_END = object()  # the source has nothing more


class _Stopped(Exception):
    """A stop was asked for while the attempt waited on its source."""


async def _pull(
    stream: AsyncIterator[Part], watch: Watch, task: asyncio.Task[Any] | None
) -> Part | object:
    """The source's next part (`_END` at its end), its wait cancelled by a stop (a stalled
    model must not delay a cancel until its own timeout). A plug-in's own failure is
    permanent, and only its class reaches clients."""
    watch.waiting = task
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return _END
    except asyncio.CancelledError:
        if watch.woke and task is not None and task.uncancel() == 0:
            watch.woke = False
            raise _Stopped() from None
        raise
    except ModelError:
        raise
    except Exception as exc:
        logger.exception("reply source failed")
        raise PermanentModelError(f"the reply source failed: {type(exc).__name__}") from exc
    finally:
        watch.waiting = None


async def _close(stream: AsyncIterator[Part] | None) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def _open(d: RunDeps, prompt: Prompt) -> AsyncIterator[Part]:
    """The source's stream for this prompt: a source that fails to give one fails as it
    would mid-stream (permanent, its class name only)."""
    try:
        stream = d.model.stream(prompt)
        aiter(stream)
    except ModelError:
        raise
    except Exception as exc:
        raise PermanentModelError(f"the reply source failed: {type(exc).__name__}") from exc
    return stream


def _event(d: RunDeps, run_id: str, attempt: int, index: int, item: Part) -> Event:
    if isinstance(item, str):
        return chunk(run_id, attempt, index, item)
    if not isinstance(item, Data) or not isinstance(item.name, str):
        raise InvalidDataEvent(f"the reply source yielded a {type(item).__name__}")
    if not DATA_NAME.fullmatch(item.name):
        raise InvalidDataEvent("a data event's name must match ^[A-Za-z0-9_.:-]{1,64}$")
    try:
        size = len(json.dumps(item.payload, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidDataEvent(f"a data event's payload is not JSON: {exc}") from None
    if size > d.settings.max_data_bytes:
        raise InvalidDataEvent(f"a data event is larger than {d.settings.max_data_bytes} bytes")
    return data(run_id, attempt, index, item.name, item.payload)


async def _faults(d: RunDeps, pub: Any, thread_id: str, index: int, own: int) -> None:
    """The crash tests' points inside the reply: `chunk:<i>` (the reply's part i) and
    `attempt_chunk:<n>` (this attempt's n-th part: every attempt dies, a poison run)."""
    s = d.settings
    if s.fault_point in (f"chunk:{index}", f"attempt_chunk:{own}"):
        await pub.flush()
        fault(d, s.fault_point, thread_id)
