"""What one attached client receives: its run's events from the shared tail, with resets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..store.runs import TERMINAL, Run
from .events import Event, chunk, done, reset, run_started
from .tail import ThreadTail

RunLookup = Callable[[], Awaitable[Run | None]]
# One write to a client at most (plus one frame): a slow reader catching up on a long log gets
# it in pieces as its socket drains, not as one copy of the whole backlog per client.
MAX_WRITE_BYTES = 64 * 1024


@dataclass(slots=True)
class Cursor:
    """A client's position: the last sequence processed, and what it has shown of the run."""

    seq: int = 0
    attempt: int = 0  # attempt whose events the client holds
    shown: bool = False  # the client has events of `attempt` (a new attempt needs a reset)
    resumed: bool = False  # the client came with a Last-Event-ID


def step(cursor: Cursor, run_id: str, ev: Event) -> tuple[list[Event], bool]:
    """Events to send for one log event, and whether the run is over for this client."""
    cursor.seq = max(cursor.seq, ev.seq)
    if ev.type == "done" and ev.run_id == run_id:
        return [ev], True  # the run's one `done` is final, whichever attempt wrote it
    if ev.run_id != run_id or ev.attempt < cursor.attempt:
        return [], False  # another run's event, or a superseded attempt's straggler
    out: list[Event] = []
    if ev.attempt > cursor.attempt:
        # A resumed client that lands on a run_started was before this attempt: it may hold
        # an earlier attempt's chunks. One that lands mid-attempt is simply continuing.
        if cursor.shown or (cursor.resumed and ev.type == "run_started"):
            out.append(reset(run_id, ev.attempt))
        cursor.attempt, cursor.shown, cursor.resumed = ev.attempt, False, False
    out.append(ev)
    cursor.shown = True
    return out, ev.type == "done"


def replay_from_store(run: Run) -> list[Event]:
    """A finished run whose events left the stream (expired or purged): rebuild from the rows."""
    attempt = max(run.attempt, 1)
    events = [run_started(run.run_id, attempt)]
    if run.output is not None:
        events.append(chunk(run.run_id, attempt, 0, run.output))
    status = run.status if run.status in TERMINAL else "error"
    events.append(done(run.run_id, attempt, status, run.error))  # type: ignore[arg-type]
    return events


async def relay(
    tail: ThreadTail,
    run_id: str,
    lookup: RunLookup,
    *,
    last_event_id: int | None,
    keepalive_s: float,
    recheck_s: float = 0.5,
) -> AsyncIterator[list[Event]]:
    """Replay the run from the tail's log, follow it live, end after its `done`.

    Yields batches of events to send (an empty batch: send a keepalive); the caller encodes
    them (SSE frames, or another wire format).
    """
    loop = asyncio.get_running_loop()
    cursor = Cursor(seq=last_event_id or 0, resumed=bool(last_event_id))
    last_write = loop.time()
    next_check, check_every = loop.time() + recheck_s, recheck_s
    while True:
        batch: list[Event] = []
        size = 0
        finished = more = False
        seen = tail.last_seq  # anything taken after this wakes the wait below at once
        for ev in tail.after(cursor.seq):
            out, finished = step(cursor, run_id, ev)
            for e in out:
                batch.append(e)
                size += len(e.frame) or 64
            if finished:
                break
            if size >= MAX_WRITE_BYTES:
                more = True
                break
        if batch:
            yield batch
            last_write = loop.time()
        if finished:
            return
        if more:
            continue  # the rest is already in the log: no waiting
        now = loop.time()
        if not cursor.shown and tail.caught_up.is_set() and now >= next_check:
            # Nothing of the run is in the stream: if it has ended, its events are gone.
            run = await lookup()
            if run is not None and run.status in TERMINAL:
                if not _run_in_log(tail, run_id):
                    yield replay_from_store(run)
                    return
                if cursor.resumed and tail.last_seq <= cursor.seq:
                    return  # a resume after the last event: the client has it all
            check_every = min(check_every * 2, keepalive_s)
            next_check = loop.time() + check_every
        if now >= last_write + keepalive_s:
            yield []
            last_write = now
        deadline = last_write + keepalive_s
        if not cursor.shown:
            deadline = min(deadline, next_check)
        await tail.wait(seen, max(deadline - loop.time(), 0.001))


def _run_in_log(tail: ThreadTail, run_id: str) -> bool:
    return any(ev.run_id == run_id for ev in tail.log)
