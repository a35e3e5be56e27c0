"""What one client receives: the rest of its run from its place, wherever the parts are held.

A client's place (streams/position.py) says it holds parts 0..n-1 of run R as of attempt a.
`advance` is the one rule, a pure function of that place and a fold of R (streams/reply.py):

1. If an attempt after a keeps fewer than n parts, the client is told first: a regenerating
   attempt (or, for a client that cannot cut, any such attempt) gets a `reset` and the reply
   starts over from part 0; a continuation that keeps k < n gets its `run_started`
   (`resume_from: k`) and the client keeps parts 0..k-1 (the v2 meaning).
2. Then R's parts from index n on, in index order, each after the `run_started` of its
   attempt when that attempt is newer than the client's; never an index twice, never past a
   part it does not have.
3. `done` last, once the client holds every part.

`relay` only chooses which fold serves the client: the pod's tail (a cache), else R's events
read from JetStream, else R's stored reply once R has ended. A source that cannot say what
part n is — a tail that dropped it, a read that found nothing more, a subject purged by the
next run — is never taken for the end: the next source is asked, or the relay waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..errors import StreamUnavailable
from ..store.runs import TERMINAL, Run
from .events import Event, chunk, data, done, part_frame, reset, run_started, sse_frame, stalled
from .position import Position
from .reply import Reply
from .tail import ThreadTail

logger = logging.getLogger(__name__)

# One write to a client at most (plus one frame): a slow reader catching up on a long reply
# gets it in pieces as its socket drains, not as one copy of the whole backlog per client.
MAX_WRITE_BYTES = 64 * 1024
RECHECK_S = 0.5  # first wait before asking the database again about a run no fold serves
CATCH_UP_S = 5.0  # a new tail's first read of the subject, waited for this long at most


def advance(
    pos: Position, reply: Reply, *, truncate: bool = True, budget: int = MAX_WRITE_BYTES
) -> list[Event]:
    """The events that take a client at `pos` forward in `reply`, which must hold part
    `pos.parts` if it has it (`reply.first <= pos.parts`). Updates `pos`."""
    out: list[Event] = []
    while (cut := reply.cut(pos.attempt, pos.parts)) is not None:
        k = cut.resume_from or 0
        if truncate and k and cut.type == "run_started":
            pos.attempt, pos.parts, pos.seq = cut.attempt, k, cut.seq
            out.append(_marker(cut, pos))
        else:
            base = reply.lineage[0]
            pos.attempt, pos.parts, pos.seq = base.attempt, 0, base.seq
            out += [_marker(reset(reply.run_id, base.attempt), pos), _marker(base, pos)]
    size = 0
    while reply.first <= pos.parts < reply.total and size < budget:
        part = reply.part(pos.parts)
        if part.attempt > pos.attempt:
            started = reply.started_of(part.attempt)
            if started is not None and started.attempt > pos.attempt:
                pos.attempt, pos.seq = part.attempt, started.seq
                out.append(_marker(started, pos))
            pos.attempt = part.attempt
        pos.parts += 1
        pos.seq = part.seq
        if part.attempt < pos.attempt:
            # Told by another source as an earlier attempt's (a stored reply labels its parts
            # with the final attempt): a client would drop it as a straggler.
            part = part.with_seq(part.seq)
            part.attempt = pos.attempt
            part_frame(part)
        out.append(part)
        size += len(part.frame) or 64
    newest = reply.started
    if (
        newest is not None
        and newest.attempt > pos.attempt
        and pos.parts == reply.total
        and pos.parts >= (newest.resume_from or 0)
    ):
        pos.attempt, pos.seq = newest.attempt, newest.seq
        out.append(_marker(newest, pos))
    if reply.done is not None and pos.parts == reply.total and not pos.done:
        pos.done, pos.seq = True, reply.done.seq
        out.append(_marker(reply.done, pos))
    return out


def _marker(ev: Event, pos: Position) -> Event:
    """An event that is not a part, with this client's place as its id (its own frame)."""
    copy = ev.with_seq(ev.seq)
    copy.frame = sse_frame(copy, pos.id())
    return copy


def frames(batch: list[Event]) -> bytes:
    """A batch as SSE: markers carry their own frame, parts the pod's shared one."""
    return b"".join(e.frame or part_frame(e) for e in batch)


@dataclass(slots=True)
class Sources:
    """Where a run's parts are held: the pod's tail, JetStream, the database."""

    tail: ThreadTail
    lookup: Callable[[], Awaitable[Run | None]]  # the run's row now
    stored: Callable[[Run], Awaitable[Reply]]  # the fold of an ended run's stored reply
    read_after: Callable[[int], AsyncGenerator[list[Event], None]] | None = None
    event_at: Callable[[int], Awaitable[Event | None]] | None = None


async def relay(
    pos: Position,
    run: Run,
    src: Sources,
    *,
    keepalive_s: float,
    truncate: bool = True,
) -> AsyncIterator[list[Event]]:
    """Batches of events that take the client from `pos` to its run's `done` (an empty batch:
    time for a keepalive). `pos` is kept up to date: after each batch it is the client's."""
    loop = asyncio.get_running_loop()
    tail = src.tail
    last_write = loop.time()
    check_at, check_every = loop.time() + RECHECK_S, RECHECK_S  # the next look at the row
    stream_at, stream_every = 0.0, RECHECK_S  # the next read from JetStream allowed
    stored: Reply | None = None
    ended_seen = streamed_ended = False
    stalled_sent = 0
    began = loop.time()
    while not pos.done:
        seen = tail.last_seq
        view = tail.view(pos.run_id)
        ended = run.status in TERMINAL or tail.later_than(run.seq) or pos.run_id in tail.ended
        if view is not None and view.complete and view.first <= pos.parts:
            batch = advance(pos, view, truncate=truncate)
            stall = tail.stalled
            if (
                stall is not None
                and stall[0] == pos.run_id
                and stall[1] > stalled_sent
                and tail.current is view
                and not pos.done
            ):
                stalled_sent = stall[1]
                batch.append(_marker(stalled(*stall), pos))
            if batch:
                yield batch
                last_write = loop.time()
                continue
            if not ended:
                # Live and caught up: what comes next reaches the tail. A run ended with no
                # `done` reaching this tail (published before it subscribed again) is found
                # by a look at its row once the tail has been silent for a while.
                if loop.time() >= check_at and loop.time() - tail.last_event_at >= keepalive_s:
                    run = await _look(src, run)
                    check_at = loop.time() + keepalive_s
                    if run.status in TERMINAL:
                        continue
                await tail.wait(seen, max(last_write + keepalive_s - loop.time(), 0.001))
                if loop.time() >= last_write + keepalive_s:
                    yield []
                    last_write = loop.time()
                continue
        if not tail.caught_up.is_set() and loop.time() < began + CATCH_UP_S:
            # A tail just started reads the subject from its first event: what it will hold
            # is not known yet.
            await tail.wait(seen, max(min(last_write + keepalive_s, began + CATCH_UP_S)
                                      - loop.time(), 0.001))  # fmt: skip
            continue
        trimmed = view is not None and view.complete and not ended
        if (trimmed or (ended and not streamed_ended)) and loop.time() >= stream_at:
            # Not in the tail (dropped from a long reply, or never held here): JetStream, which
            # holds the run until the next one purges it, before the stored reply.
            streamed_ended = streamed_ended or ended
            sent = False
            async for batch in _from_stream(pos, src, truncate):
                yield batch
                sent = True
                last_write = loop.time()
            if sent:
                stream_every = RECHECK_S
                continue
            stream_at, stream_every = loop.time() + stream_every, min(2 * stream_every, keepalive_s)
        if ended and not ended_seen:
            ended_seen, check_at = True, loop.time()  # look for its end now, then back off
        if loop.time() >= check_at:
            run = await _look(src, run)
            if run.status in TERMINAL:
                stored = stored or await _stored(src, run)
            if stored is not None:
                batch = advance(pos, stored, truncate=truncate)
                if batch:
                    yield batch
                    last_write = loop.time()
                    continue
            check_every = min(check_every * 2, keepalive_s)
            check_at = loop.time() + check_every
        if loop.time() >= last_write + keepalive_s:
            yield []
            last_write = loop.time()
        deadline = min(last_write + keepalive_s, check_at, max(stream_at, loop.time()))
        await tail.wait(seen, max(deadline - loop.time(), 0.001))


async def _look(src: Sources, run: Run) -> Run:
    """The run's row now; with the database away, the one known (the client waits, with
    keepalives: an outage is never the end of a stream)."""
    try:
        return await src.lookup() or run
    except Exception as exc:
        logger.debug("reading a run's row failed: %r", exc)
        return run


async def _stored(src: Sources, run: Run) -> Reply | None:
    try:
        return await src.stored(run)
    except Exception as exc:
        logger.debug("reading a stored reply failed: %r", exc)
        return None


async def _from_stream(
    pos: Position, src: Sources, truncate: bool
) -> AsyncGenerator[list[Event], None]:
    """The client's parts from JetStream while the tail cannot serve them: read from the hint
    when the subject still holds the client's event there, else from the subject's first
    event. Stops at `done`, when the tail can serve again, when the subject has nothing more
    now, or when it does not hold the run's reply (purged by the next run, expired)."""
    assert src.read_after is not None
    after, fold = 0, Reply(pos.run_id)
    if pos.seq and pos.parts and src.event_at is not None:
        with contextlib.suppress(Exception):
            held = await src.event_at(pos.seq)
            if held is not None and held.run_id == pos.run_id:
                after, fold = pos.seq, Reply.resumed(pos.run_id, pos.attempt, pos.parts, pos.seq)
    try:
        async with contextlib.aclosing(src.read_after(after)) as pages:
            async for page in pages:
                for ev in page:
                    if ev.run_id == pos.run_id:
                        fold.apply(ev)
                    elif ev.type == "run_started" and fold.lineage:
                        return  # a later run began: the rest of this one was purged
                if fold.lineage and not fold.complete:
                    return  # the run's reply does not begin in the subject (expired)
                while batch := advance(pos, fold, truncate=truncate):
                    yield batch
                    if pos.done:
                        return
                fold.forget(pos.parts)  # what the client holds is not kept
                if fold.first > pos.parts:
                    return
                live = src.tail.view(pos.run_id)
                if live is not None and live.complete and live.first <= pos.parts:
                    return  # the tail holds the rest
    except StreamUnavailable as exc:
        logger.warning("reading a reply from JetStream failed: %s", exc.message)
    except Exception as exc:  # NATS away: the relay asks again later
        logger.warning("reading a reply from JetStream failed: %r", exc)


def stored_fold(run: Run, parts: list[str | tuple[str, object]] | None) -> Reply:
    """The fold of an ended run from its row: the lineage its attempts recorded, its stored
    parts (all of the final attempt), then `done`."""
    reply = Reply(run.run_id)
    final = max(run.attempt, 1)
    lineage: list[Event] = []
    recorded = any("kept" in entry for entry in run.attempts)
    for entry in run.attempts:
        kept = entry.get("kept")
        if kept is None and not recorded:
            # Recorded before attempts said what they kept: continued, or taken as
            # regenerated (a reset at worst, never a wrong reply).
            kept = entry.get("resume_from", 0)
        if kept is None:
            continue  # it died before deciding: it published nothing
        attempt = int(entry.get("attempt", 0))
        ev = run_started(run.run_id, attempt, int(kept) or None, entry.get("executor"), run.seq)
        lineage = [ev] if not kept else [*lineage, ev]
    reply.lineage = lineage or [run_started(run.run_id, final, None, run.executor, run.seq)]
    final = reply.lineage[-1].attempt  # later attempts published nothing
    reply.complete = True
    for i, p in enumerate(parts or []):
        if isinstance(p, str):
            reply.parts.append(chunk(run.run_id, final, i, p))
        else:
            name, payload = p
            reply.parts.append(data(run.run_id, final, i, str(name), payload))
    status = run.status if run.status in TERMINAL else "error"
    reply.done = done(run.run_id, max(run.attempt, final), status, run.error)  # type: ignore[arg-type]
    return reply


async def legacy_place(seq: int, src: Sources) -> Position | None:
    """The place of a client back with a v2 id (the stream sequence of its last event), read
    from JetStream: the fold of its run's events up to there. None when the stream no longer
    holds that event or its run's beginning: what the client holds cannot be known."""
    if src.event_at is None or src.read_after is None:
        return None
    held = await src.event_at(seq)
    if held is None:
        return None
    if held.type == "done":
        return Position(held.run_id, held.attempt, 0, seq, done=True)
    fold = Reply(held.run_id)
    async with contextlib.aclosing(src.read_after(0)) as pages:
        async for page in pages:
            for ev in page:
                if ev.seq > seq:
                    break
                fold.apply(ev)
                fold.forget(fold.total)  # counted, not kept
            else:
                continue
            break
    if not fold.complete:
        return None
    return Position(held.run_id, fold.attempt, fold.total, seq)
