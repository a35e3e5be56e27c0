"""GET /threads/{id}/attach: the SSE stream of the thread's latest run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import InvalidRequest, ThreadNotFound
from ..store.runs import Run
from ..streams.events import KEEPALIVE, sse_frame
from ..streams.relay import relay
from .deps import (
    AttachLimiterDep,
    HubDep,
    RuntimeDep,
    StreamPrincipalDep,
    ThreadId,
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


def _event_id(header: str | None, query: str | None) -> int | None:
    raw = header if header is not None else query
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 19:
        raise InvalidRequest("Last-Event-ID must be a stream sequence (a non-negative integer)")
    return int(raw)


@router.get(
    "/threads/{thread_id}/attach",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "run_started, reset, chunk, done",
        },
        204: {"description": "The thread has no run"},
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
) -> Response:
    """Replay the thread's latest run from its first event, follow it live, end after `done`."""
    after = _event_id(last_event_id_header, last_event_id)
    # Someone else's thread is 404; a thread that does not exist yet is 204, like an empty one.
    await require_reader(rt, principal, thread_id, ThreadNotFound)
    run = await rt.store.latest_run(thread_id)
    if run is None:
        return Response(status_code=204)
    slot = limiter.acquire(
        principal.name,
        per_principal=rt.settings.max_attach_per_principal,
        per_pod=rt.settings.max_attach_per_pod,
    )
    return SseResponse(
        _stream(rt, hub, run, after),
        slot=slot,
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


class SseResponse(StreamingResponse):
    """Holds its attach slot for as long as the response runs, however it ends."""

    def __init__(self, content: AsyncIterator[bytes], *, slot: AttachSlot, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


async def _stream(rt: RuntimeDep, hub: HubDep, run: Run, after: int | None) -> AsyncIterator[bytes]:
    async def lookup() -> Run | None:
        return await rt.store.get_run(run.thread_id, run.run_id)

    async with hub.attach(run.thread_id) as tail:
        async for batch in relay(
            tail, run.run_id, lookup, last_event_id=after, keepalive_s=rt.settings.keepalive_s
        ):
            yield b"".join(sse_frame(e) for e in batch) if batch else KEEPALIVE
