"""GET /threads/{id}/attach: the SSE stream of the thread's latest run."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import InvalidRequest, ThreadNotFound
from ..store.runs import Run
from ..streams.events import KEEPALIVE, sse_frame
from ..streams.relay import finished_in_log, relay
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
from .limits import AttachSlot
from .schemas import error_responses

router = APIRouter(tags=["attach"])

SSE_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
    "Connection": "keep-alive",
}


_EVENT_ID = re.compile(r"[0-9]{1,19}")


def _event_id(header: str | None, query: str | None) -> int | None:
    raw = header if header is not None else query
    if raw is None or raw == "":
        return None
    if not _EVENT_ID.fullmatch(raw):  # ASCII digits: str.isdigit() takes "²"
        raise InvalidRequest("Last-Event-ID must be a stream sequence (a non-negative integer)")
    return int(raw)


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
            " Last-Event-ID is at or after the run's `done` (an EventSource stops on 204)"
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
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id: Annotated[
        str | None, Query(description="Same as the Last-Event-ID header")
    ] = None,
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
    """Replay the thread's latest run from its first event, follow it live, end after `done`."""
    after = _event_id(last_event_id_header, last_event_id)
    reader = reader_of(principal)
    run = await rt.store.latest_run(thread_id, reader=reader)
    if run is None:
        # Someone else's thread is 404; one that does not exist yet has no run.
        await require_reader(rt, principal, thread_id, ThreadNotFound)
        if not wait or format == "ai-sdk":
            return Response(status_code=204)
    slot = limiter.acquire(
        principal.name,
        per_principal=rt.settings.max_attach_per_principal,
        per_pod=rt.settings.max_attach_per_pod,
    )
    try:
        tail = await hub.acquire(thread_id)
    except BaseException:
        slot.release()
        raise
    if format == "ai-sdk" and run is not None:
        from .aisdk import ui_stream_response  # aisdk imports this module

        return ui_stream_response(rt, hub, tail, slot, thread_id, run.run_id, reader, after)
    if run is not None and after is not None and finished_in_log(tail, run.run_id, after):
        hub.release(tail)
        slot.release()
        return Response(status_code=204)
    return SseResponse(
        _stream(rt, tail, thread_id, run, reader, after),
        slot=slot,
        release=lambda: hub.release(tail),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


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
    rt: RuntimeDep,
    tail: ThreadTail,
    thread_id: str,
    run: Run | None,
    reader: str | None,
    after: int | None,
) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    keepalive_s = rt.settings.keepalive_s
    every, last_write = 0.5, loop.time()
    while run is None:
        # A new thread: wait for its first run, woken by its subject and checked in the
        # database, filtered by the reader (a thread someone else creates meanwhile stays
        # theirs: the stream ends without showing anything).
        seen = tail.last_seq
        run = await rt.store.latest_run(thread_id, reader=reader)
        if run is not None:
            after = None
            break
        owner = await rt.store.thread_owner(thread_id)
        if owner is not None and reader is not None and owner != reader:
            return
        await tail.wait(seen, max(min(every, keepalive_s - (loop.time() - last_write)), 0.01))
        every = min(every * 2, keepalive_s)
        if loop.time() - last_write >= keepalive_s - 0.01:
            yield KEEPALIVE
            last_write = loop.time()
    run_id = run.run_id

    async def lookup() -> Run | None:
        return await rt.store.get_run(thread_id, run_id, reader=reader)

    async for batch in relay(tail, run_id, lookup, last_event_id=after, keepalive_s=keepalive_s):
        yield b"".join(sse_frame(e) for e in batch) if batch else KEEPALIVE
