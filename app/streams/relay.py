"""What one attached client receives: its run's events from the shared tail, one coherent reply.

The client rules of contract v2 live in `step`, a pure function over a small `Cursor`: a
continued attempt (`run_started.resume_from: k`) goes on from part k with no `reset` (the
client keeps its first k parts); an attempt that regenerates the reply gets a `reset` first
for a client that holds parts. Stragglers of a superseded attempt, duplicates and the far
side of a gap (a part whose predecessor was never stored) are never sent, so a client never
holds a part past k when a continued attempt begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..store.runs import TERMINAL, Run
from .events import Event, chunk, done, reset, run_started, stalled
from .reply import fold
from .tail import ThreadTail

logger = logging.getLogger(__name__)

RunLookup = Callable[[], Awaitable[Run | None]]
# One write to a client at most (plus one frame): a slow reader catching up on a long log gets
# it in pieces as its socket drains, not as one copy of the whole backlog per client.
MAX_WRITE_BYTES = 64 * 1024


@dataclass(slots=True)
class Cursor:
    """A client's position: the last sequence processed, and the reply it holds.

    `parts`: how many parts of the run the client holds (indexes 0..parts-1). `unsure`: it
    came back with a Last-Event-ID the log can no longer account for: it may hold anything.
    `quiet_until`: it came back with a Last-Event-ID the tail no longer holds in memory: the
    events up to it are read again from JetStream to know what it holds, and not sent.
    """

    seq: int = 0
    attempt: int = 0
    parts: int = 0
    unsure: bool = False
    stalled_sent: int = 0  # the attempt whose `stalled` this client got
    quiet_until: int = 0


def step(cursor: Cursor, run_id: str, ev: Event) -> list[Event]:
    """The events to send for one log event."""
    cursor.seq = max(cursor.seq, ev.seq)
    if ev.run_id != run_id:
        return []  # another run's event
    if ev.type == "done":
        return [ev]  # the run's one `done` is final, whichever attempt wrote it
    if ev.attempt < cursor.attempt:
        return []  # a straggler of a superseded attempt
    out: list[Event] = []
    if ev.type == "run_started":
        k = ev.resume_from
        if k is None:
            if cursor.parts or cursor.unsure:
                out.append(reset(run_id, ev.attempt))
            cursor.parts = 0
        else:
            # A continued attempt's parts come from a subject that held its first k parts
            # when the log began (a purge point): a client unsure of what it holds is one
            # that missed that point, and met a regenerating `run_started` first.
            cursor.parts = min(cursor.parts, k) if not cursor.unsure else k
        cursor.attempt, cursor.unsure = ev.attempt, False
        out.append(ev)
        return out
    cursor.attempt = ev.attempt
    if ev.part:
        if ev.index != cursor.parts:
            return []  # a duplicate, or the far side of a gap: the next attempt resends it
        cursor.parts += 1
    out.append(ev)
    return out


def replay_from_store(run: Run) -> list[Event]:
    """A finished run whose events left the stream (expired or purged): rebuild from the rows."""
    attempt = max(run.attempt, 1)
    events = [run_started(run.run_id, attempt)]
    if run.output is not None:
        events.append(chunk(run.run_id, attempt, 0, run.output))
    status = run.status if run.status in TERMINAL else "error"
    events.append(done(run.run_id, attempt, status, run.error))  # type: ignore[arg-type]
    return events


def resumed_cursor(tail: ThreadTail, run_id: str, last_event_id: int) -> Cursor:
    """The position of a client back with a Last-Event-ID: what it holds is what the log says
    it was sent, when the log still reaches back that far."""
    head = tail.head
    ours = head is not None and head.run_id == run_id
    if ours and tail.spilled(last_event_id):
        # The tail dropped that part of the run from memory: from the run's first event in
        # JetStream, sending nothing up to the client's.
        assert head is not None
        return Cursor(seq=head.seq - 1, quiet_until=last_event_id)
    if tail.missed(last_event_id):
        return Cursor(seq=last_event_id, unsure=True)
    if ours and head is not None and tail.trimmed_seq >= head.seq:
        # The log begins inside the run: from where the reply stood at its beginning.
        cursor = Cursor(
            seq=tail.trimmed_seq, attempt=tail.spilled_attempt, parts=tail.spilled_parts
        )
        for ev in tail.upto(last_event_id):
            step(cursor, run_id, ev)
        cursor.seq = last_event_id
        return cursor
    folded = fold(run_id, tail.upto(last_event_id))
    return Cursor(seq=last_event_id, attempt=folded.attempt, parts=len(folded.parts))


def finished_in_log(tail: ThreadTail, run_id: str, seq: int) -> bool:
    """The run's `done` is in the log at or before `seq` (a client there has it all)."""
    return any(e.type == "done" and e.run_id == run_id for e in tail.upto(seq))


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
    if last_event_id:
        # This pod's log may not hold what the client already has yet: a tail just started, or
        # one a few events behind the pod the client came from (each pod gets the events on
        # its own). Read from it now, the client would look as if it held fewer parts, and
        # every later part would be dropped as the far side of a gap (seen: a client back on
        # another pod got only `done`; in the nemesis, a reply short of its last two parts).
        # Wait until the log reaches the client's event, keepalives meanwhile.
        reached = await _reached(tail, last_event_id)
        while not reached():
            seen = tail.last_seq
            await tail.wait(seen, keepalive_s)
            if tail.last_seq == seen and not reached():
                yield []
        cursor = resumed_cursor(tail, run_id, last_event_id)
    else:
        cursor = Cursor(seq=tail.start_of(run_id))
    last_write = loop.time()
    next_check, check_every = loop.time() + recheck_s, recheck_s
    while True:
        if tail.spilled(cursor.seq):
            # The tail dropped these events from memory (a huge reply): read from JetStream.
            finished = False
            try:
                async with contextlib.aclosing(_backfill(tail, run_id, cursor)) as batches:
                    async for spilled in batches:
                        yield spilled
                        last_write = loop.time()
                        if any(e.type == "done" and e.run_id == run_id for e in spilled):
                            finished = True
                            break
            except Exception as exc:  # NATS away: as for a log that lost them (below)
                logger.warning("reading a reply's start from JetStream failed: %r", exc)
                cursor = Cursor(seq=tail.trimmed_seq, attempt=cursor.attempt, unsure=True)
            if finished:
                return
            continue  # the tail may have dropped more meanwhile
        if tail.missed(cursor.seq):
            # Slowed by its socket, the client fell behind what the log holds: the run's end
            # is in the database once it has one (the next run purged the subject).
            run = await lookup()
            if run is not None and run.status in TERMINAL and not _done_in_log(tail, run_id):
                yield _stored_ending(cursor, run)
                return
            cursor = Cursor(seq=tail.trimmed_seq, attempt=cursor.attempt, unsure=True)
        batch: list[Event] = []
        size = 0
        finished = more = False
        seen = tail.last_seq  # anything taken after this wakes the wait below at once
        for ev in tail.after(cursor.seq):
            for e in step(cursor, run_id, ev):
                batch.append(e)
                size += len(e.frame) or 64
                finished = e.type == "done"
            if finished:
                break
            if size >= MAX_WRITE_BYTES:
                more = True
                break
        if not finished and tail.stalled is not None:
            stalled_run, stalled_attempt, executor = tail.stalled
            if stalled_run == run_id and cursor.stalled_sent < stalled_attempt:
                cursor.stalled_sent = stalled_attempt
                batch.append(stalled(run_id, stalled_attempt, executor))
        if batch:
            yield batch
            last_write = loop.time()
        if finished:
            return
        if more:
            continue  # the rest is already in the log: no waiting
        now = loop.time()
        shown = cursor.parts > 0 or cursor.attempt > 0
        head = tail.head
        # The thread moved on to a later run while this one's `done` never reached the log
        # (a resubscription after NATS came back started past the purge that removed it).
        moved_on = head is not None and head.run_id != run_id and cursor.seq >= head.seq
        if (not shown or moved_on) and tail.caught_up.is_set() and now >= next_check:
            # Nothing (more) of the run is in the stream: if it has ended, its end is stored.
            run = await lookup()
            if run is not None and run.status in TERMINAL and not _done_in_log(tail, run_id):
                yield _stored_ending(cursor, run)
                return
            check_every = min(check_every * 2, keepalive_s)
            next_check = loop.time() + check_every
        if now >= last_write + keepalive_s:
            yield []
            last_write = now
        deadline = last_write + keepalive_s
        if not shown or moved_on:
            deadline = min(deadline, next_check)
        await tail.wait(seen, max(deadline - loop.time(), 0.001))


async def _reached(tail: ThreadTail, last_event_id: int) -> Callable[[], bool]:
    """When the log holds everything a client back at `last_event_id` was sent: the subject's
    newest event bounds it (an id of an event purged since is never reached). Without an
    answer from JetStream (away), a tail that caught up with the subject is taken at its word.
    """
    if tail.last_seq >= last_event_id:
        return lambda: True
    if tail.subject_last is not None:
        try:
            target = min(last_event_id, await tail.subject_last())
        except Exception as exc:
            logger.warning("cannot read the subject's newest sequence: %r", exc)
        else:
            return lambda: tail.last_seq >= target
    return lambda: tail.caught_up.is_set() or tail.last_seq >= last_event_id


async def _backfill(
    tail: ThreadTail, run_id: str, cursor: Cursor
) -> AsyncGenerator[list[Event], None]:
    """The client's events that left the tail's memory, read from JetStream, stepped like the
    log's, in batches of about MAX_WRITE_BYTES. The cursor ends where the log took over when
    the reading stopped (the relay reads again if the tail dropped more meanwhile), or at the
    run's `done`."""
    assert tail.history is not None
    head = tail.head
    first = head is not None and cursor.seq == head.seq - 1  # the run's first event comes next
    reached = 0  # every event of the subject up to here was read (or is lost)
    batch: list[Event] = []
    size = 0
    async with contextlib.aclosing(tail.history(cursor.seq)) as pages:
        async for page in pages:
            for ev in page:
                if ev.seq <= cursor.seq:
                    continue
                if first and head is not None and ev.seq != head.seq:
                    # The stream lost the run's beginning (its limits): as a log that did.
                    cursor.unsure = True
                    reached = tail.trimmed_seq
                    break
                first = False
                if ev.seq > tail.trimmed_seq:
                    reached = tail.trimmed_seq  # the log holds the rest
                    break
                out = step(cursor, run_id, ev)
                if ev.seq <= cursor.quiet_until:
                    continue  # the client has it: only what it holds is counted
                batch += out
                size += sum(len(e.frame) or 64 for e in out)
                if any(e.type == "done" for e in out):
                    yield batch
                    return
                if size >= MAX_WRITE_BYTES:
                    yield batch
                    batch, size = [], 0
            else:
                continue  # the page is used up: the next one
            break
        else:
            reached = tail.trimmed_seq  # the subject has nothing more now
    # Set before the last yield: the tail may drop more while the client writes it.
    cursor.seq = max(cursor.seq, reached)
    if batch:
        yield batch


def _stored_ending(cursor: Cursor, run: Run) -> list[Event]:
    """The stored reply in place of events the stream no longer has (a `reset` first for a
    client that may hold some of them)."""
    events = replay_from_store(run)
    if cursor.parts or cursor.unsure:
        return [reset(run.run_id, events[0].attempt), *events]
    return events


def _done_in_log(tail: ThreadTail, run_id: str) -> bool:
    return any(ev.type == "done" and ev.run_id == run_id for ev in tail.log)
