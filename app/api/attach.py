"""GET /threads/{id}/attach: the SSE stream of the thread's latest run, or of the run a client
comes back to (its Last-Event-ID, contract v3), served by any pod."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..auth import Principal
from ..errors import InvalidRequest, ThreadNotFound
from ..store.runs import Run
from ..streams.events import KEEPALIVE, reset, sse_frame
from ..streams.hub import TailHub
from ..streams.position import Position, parse
from ..streams.relay import Sources, frames, legacy_place, relay, stored_fold
from ..streams.tail import ThreadTail
from .deps import (
    AttachLimiterDep,
    HubDep,
    RuntimeDep,
    StreamPrincipalDep,
    ThreadId,
    reader_of,
    require_reader,
)
from .limits import AttachLimiter, AttachSlot
from .schemas import error_responses

router = APIRouter(tags=["attach"])

SSE_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
    "Connection": "keep-alive",
}

LastEventIdHeader = Annotated[str | None, Header(alias="Last-Event-ID")]
LastEventIdQuery = Annotated[str | None, Query(description="Same as the Last-Event-ID header")]


def sources(rt: RuntimeDep, tail: ThreadTail, run: Run, reader: str | None) -> Sources:
    """Where the run's parts are held, for one client."""
    thread_id, run_id = run.thread_id, run.run_id

    async def lookup() -> Run | None:
        return await rt.store.get_run(thread_id, run_id, reader=reader)

    async def stored(ended: Run) -> Any:
        return stored_fold(ended, await rt.store.stored_reply(ended.run_id))

    buffer = rt.buffer
    if buffer is None:
        return Sources(tail, lookup, stored)
    return Sources(
        tail,
        lookup,
        stored,
        read_after=lambda after: buffer.read_after(thread_id, after),
        event_at=lambda seq: buffer.event_at(thread_id, seq),
    )


class Place:
    """Where a client's stream begins: a run and the client's place in it (`pos` None: the
    thread has no run yet); `lost`: it came back with an id whose place cannot be known."""

    def __init__(self, run: Run | None, pos: Position | None, lost: bool = False) -> None:
        self.run, self.pos, self.lost = run, pos, lost


async def place(
    rt: RuntimeDep, tail: ThreadTail, thread_id: str, reader: str | None, raw: str | None
) -> Place:
    """The client's place from its Last-Event-ID (none: the latest run, from its start)."""
    parsed = parse(raw)
    if isinstance(parsed, Position):
        run = await rt.store.get_run(thread_id, parsed.run_id, reader=reader)
        if run is None:
            raise InvalidRequest("Last-Event-ID names no run of this thread")
        return Place(run, parsed)
    if isinstance(parsed, int) and parsed > 0:
        latest = await rt.store.latest_run(thread_id, reader=reader)
        if latest is None:
            return Place(None, None)
        pos = None
        if rt.buffer is not None:
            pos = await legacy_place(parsed, sources(rt, tail, latest, reader))
            newest = await rt.buffer.last_sequence(thread_id)
            if pos is None and parsed >= newest and not latest.active:
                # At or past the subject's newest event, the latest run ended: a v2 client
                # there holds its `done` (what the v2 contract said too).
                return Place(latest, Position(latest.run_id, done=True))
        if pos is not None:
            run = await rt.store.get_run(thread_id, pos.run_id, reader=reader)
            if run is not None:
                return Place(run, pos)
        return Place(latest, Position(latest.run_id), lost=True)
    latest = await rt.store.latest_run(thread_id, reader=reader)
    return Place(latest, Position(latest.run_id) if latest is not None else None)


@router.get(
    "/threads/{thread_id}/attach",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "run_started, reset, chunk, data, stalled, done",
        },
        204: {
            "description": "Nothing to stream: the thread has no run (with wait=false), or the"
            " Last-Event-ID is the run's `done` (an EventSource stops on 204)"
        },
        **error_responses(400, 401, 404, 429, 503),
    },
)
async def attach(
    principal: StreamPrincipalDep,
    thread_id: ThreadId,
    rt: RuntimeDep,
    hub: HubDep,
    limiter: AttachLimiterDep,
    last_event_id_header: LastEventIdHeader = None,
    last_event_id: LastEventIdQuery = None,
    wait: Annotated[
        bool,
        Query(
            description="On a thread with no run yet, wait for its first one (keepalives"
            " meanwhile); false: answer 204 at once"
        ),
    ] = True,
    format: Annotated[
        Literal["sse", "ai-sdk"],
        Query(description="ai-sdk: the Vercel AI SDK's UI message stream (docs/clients.md)"),
    ] = "sse",
) -> Response:
    """The thread's latest run from its first event (or the client's run from its place),
    followed live, ending after `done`."""
    raw = last_event_id_header if last_event_id_header is not None else last_event_id
    reader = reader_of(principal)
    parsed = parse(raw)  # a malformed id is 400 before anything is held
    if isinstance(parsed, Position) and parsed.done:
        if await rt.store.get_run(thread_id, parsed.run_id, reader=reader) is None:
            raise InvalidRequest("Last-Event-ID names no run of this thread")
        return Response(status_code=204)
    slot, tail = await stream_slot(rt, hub, limiter, principal, thread_id)
    try:
        where = await place(rt, tail, thread_id, reader, raw)
        if where.run is None:
            # Someone else's thread is 404; one that does not exist yet has no run.
            await require_reader(rt, principal, thread_id, ThreadNotFound)
            if not wait or format == "ai-sdk":
                raise _NoContent()
        elif where.pos is not None and where.pos.done:
            raise _NoContent()
    except BaseException as exc:
        hub.release(tail)
        slot.release()
        if isinstance(exc, _NoContent):
            return Response(status_code=204)
        raise
    if format == "ai-sdk" and where.run is not None and where.pos is not None:
        from .aisdk import ui_stream_response  # aisdk imports this module

        return ui_stream_response(rt, hub, tail, slot, where.run, reader, where.pos)
    return SseResponse(
        _stream(rt, tail, thread_id, where, reader),
        slot=slot,
        release=lambda: hub.release(tail),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


class _NoContent(Exception):
    pass


async def stream_slot(
    rt: RuntimeDep, hub: TailHub, limiter: AttachLimiter, principal: Principal, thread_id: str
) -> tuple[AttachSlot, ThreadTail]:
    """A stream's attach slot (429 past the limits) and its thread's tail, both held until the
    stream ends; neither is left held if acquiring the other fails."""
    slot = limiter.acquire(
        principal.name,
        per_principal=rt.settings.max_attach_per_principal,
        per_pod=rt.settings.max_attach_per_pod,
    )
    try:
        return slot, await hub.acquire(thread_id, principal.name)
    except BaseException:
        slot.release()
        raise


class SseResponse(StreamingResponse):
    """Holds its attach slot (and its tail) for as long as the response runs, however it ends."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        slot: AttachSlot,
        release: Callable[[], None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(content, **kw)
        self.slot = slot
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
            if self.release is not None:
                self.release()
                self.release = None


async def _stream(
    rt: RuntimeDep, tail: ThreadTail, thread_id: str, where: Place, reader: str | None
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    keepalive_s = rt.settings.keepalive_s
    every, last_write = 0.5, loop.time()
    run = where.run
    while run is None:
        # A new thread: wait for its first run, woken by its subject and checked in the
        # database, filtered by the reader (a thread someone else creates meanwhile stays
        # theirs: the stream ends without showing anything).
        seen = tail.last_seq
        run = await rt.store.latest_run(thread_id, reader=reader)
        if run is not None:
            break
        owner = await rt.store.thread_owner(thread_id)
        if owner is not None and reader is not None and owner != reader:
            return
        await tail.wait(seen, max(min(every, keepalive_s - (loop.time() - last_write)), 0.01))
        every = min(every * 2, keepalive_s)
        if loop.time() - last_write >= keepalive_s - 0.01:
            yield KEEPALIVE
            last_write = loop.time()
    pos = where.pos if where.pos is not None and where.run is run else Position(run.run_id)
    if where.lost:
        # Back with an id this server can no longer place: whatever it holds is dropped.
        yield sse_frame(reset(run.run_id, 0), pos.id())
    src = sources(rt, tail, run, reader)
    async for batch in relay(pos, run, src, keepalive_s=keepalive_s):
        yield frames(batch) if batch else KEEPALIVE
