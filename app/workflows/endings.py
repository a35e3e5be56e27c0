"""How a run ends: the reply its clients hold is stored, whatever ended it, before `done`.

A client's reply must equal the stored one (contract v3), so every ending stores the parts
of the run's final attempt: the attempt that streamed them, or — for an ending decided before
anything streamed (a stop, the time budget, too many crashes) — what earlier attempts left in
the thread's subject, announced with the attempt's `run_started` so that clients and the
stored lineage agree. Nothing here calls the reply source.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..store.replies import StoredPart
from ..store.runs import Run
from ..streams.events import Event, run_started
from ..streams.reply import fold
from .thread_run import Outcome, RunDeps, error, is_transient, log_fields

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class Held:
    """The parts of an attempt's reply as it streams (prefix included), once it announced
    itself (its `run_started`); before that, what its clients hold is an earlier attempt's."""

    parts: list[Event] = field(default_factory=list)
    announced: bool = False

    def reply(self) -> list[Event] | None:
        return self.parts if self.announced else None


def stored(parts: list[Event]) -> list[StoredPart]:
    return [p.text or "" if p.type == "chunk" else (p.name or "", p.data) for p in parts]


async def read_prefix(d: RunDeps, run: Run) -> list[Event]:
    """The parts the run's earlier attempts left in its subject. A subject that cannot be
    read now (NATS away, no quorum) is an outage (StreamUnavailable, transient: the attempt
    waits it out), never taken for "no parts": that would regenerate a reply that is there."""
    events = await d.buffer.read_subject(run.thread_id)
    reply = fold(run.run_id, events)
    return reply.parts if reply.complete else []


async def patiently(d: RunDeps, what: str, act: Callable[[], Awaitable[T]], log: Any) -> T:
    """`act`, with an outage of PostgreSQL or NATS waited out however long (its effect is
    idempotent): a run must not be left without its reply, final status and `done`."""
    delay = 0.2
    while True:
        try:
            return await act()
        except Exception as exc:
            if not is_transient(exc):
                raise
            logger.warning("%s failed, retrying in %.1fs: %r", what, delay, exc, extra=log)
            await asyncio.sleep(delay)
            delay = min(delay * 2, d.settings.retry_cap_s or 5.0, 5.0)


async def end(
    d: RunDeps,
    run: Run,
    attempt: int,
    parts: list[Event] | None,
    status: str,
    err: dict[str, Any] | None,
) -> Outcome:
    """End the run at `attempt` with `parts` (None: decided before the attempt streamed)."""
    log = log_fields(run.run_id, run.thread_id, attempt)
    if parts is None:
        parts = await _announce(d, run, attempt, log) if attempt > 0 else []
    if parts or status == "success":
        message_status = "complete" if status == "success" else status
        await patiently(
            d,
            "storing the reply",
            lambda: d.store.store_reply(
                run.run_id, run.thread_id, attempt, stored(parts), message_status
            ),
            log,
        )
    return Outcome(status=status, attempt=attempt, error=err)


async def _announce(d: RunDeps, run: Run, attempt: int, log: Any) -> list[Event]:
    """An attempt that ends the run without streaming keeps what the subject holds: it says
    so (its record, then its `run_started`), as a continuing attempt would."""
    prefix = (
        await patiently(d, "reading the reply's parts", lambda: read_prefix(d, run), log)
        if attempt > 1
        else []
    )
    kept = len(prefix)
    if attempt > 1:
        await patiently(
            d, "recording the attempt", lambda: d.store.record_kept(run.run_id, attempt, kept), log
        )

    async def publish() -> None:
        pub = d.buffer.publisher(run.thread_id, run.run_id, attempt)
        ev = run_started(run.run_id, attempt, kept or None, d.settings.pod_name, run.seq)
        await pub.publish(ev, "start")
        await pub.flush()

    await patiently(d, "announcing the ending attempt", publish, log)
    return prefix


async def end_failed(d: RunDeps, thread_id: str, run_id: str, exc: BaseException) -> Outcome:
    """End a run whose attempts failed unexpectedly (a bug): a fresh attempt keeps what its
    clients hold, stored, with an `internal` error."""
    begin = uuid.uuid4().hex  # one begin, however many times it is sent
    run = await patiently(
        d,
        "beginning the ending attempt",
        lambda: d.store.begin_attempt(
            run_id,
            d.settings.pod_name,
            kind="retry",
            timeout_s=d.settings.run_timeout_s,
            begin=begin,
        ),
        log_fields(run_id, thread_id, 0),
    )
    err = error("internal", type(exc).__name__)
    if run is None:
        return Outcome(status="error", attempt=0, error=err)
    return await end(d, run, run.attempt, None, "error", err)
