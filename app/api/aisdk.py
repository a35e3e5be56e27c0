"""Routes for the Vercel AI SDK: what `useChat({ resume: true })` with a DefaultChatTransport
pointed at `/ai-sdk/chat` sends, answered with the run's UI message stream.

- `POST /ai-sdk/chat` — the transport's body `{id, messages, trigger, messageId}` (or the
  smaller `{id, message}` of a `prepareSendMessagesRequest` that sends only the last message:
  threadgate keeps the conversation, so the rest is not needed). `id` is the thread id; the
  new run's input is the text of the last user message. The run is accepted exactly as
  `POST /threads/{id}/runs` accepts it (same code, auth, checks and errors; `multitask_strategy`,
  `model_options`, `timeout_s` may ride in the body), then streamed. Without an
  `Idempotency-Key` header, a submitted message's id is the key: a retried send of the same
  message streams the same run.
- `GET /ai-sdk/chat/{id}/stream` — what `useChat`'s resume calls: the thread's active run
  from its start (204 when there is none); `?run_id=` streams that run even if it ended;
  `Last-Event-ID` (or `?last_event_id=`) continues after that frame with the same part ids.

Auth, thread ownership, attach limits and error bodies are those of the native routes.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..auth import Principal
from ..errors import InvalidRequest, RunNotFound, ThreadNotFound
from ..ids import check_run_id, check_thread_id
from ..store.runs import Run
from ..streams.aisdk import DONE, HEADERS, UiMessageStream
from ..streams.hub import TailHub
from ..streams.position import Position, parse
from ..streams.relay import relay
from ..streams.tail import ThreadTail
from . import runs
from .attach import (
    LastEventIdHeader,
    LastEventIdQuery,
    SseResponse,
    place,
    sources,
    stream_slot,
)
from .deps import (
    AttachLimiterDep,
    HubDep,
    PrincipalDep,
    RunnerDep,
    RuntimeDep,
    StreamPrincipalDep,
    ThreadId,
    reader_of,
    require_reader,
)
from .limits import AttachLimiter, AttachSlot
from .schemas import RunCreate, Strategy, error_responses
from .validation import invalid

router = APIRouter(prefix="/ai-sdk", tags=["ai-sdk"])

_STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "The AI SDK UI message stream (x-vercel-ai-ui-message-stream: v1)",
    }
}


class UiPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class UiMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = ""
    role: str
    parts: list[UiPart] = Field(default_factory=list)


class ChatRequest(BaseModel):
    """What a DefaultChatTransport POSTs; fields of the app's own `body` option are allowed."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="The chat id: the thread id")
    messages: list[UiMessage] = Field(default_factory=list)
    message: UiMessage | None = Field(default=None, description="Only the last message")
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = None
    multitask_strategy: Strategy = "enqueue"
    model_options: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = None


def _last_user_message(body: ChatRequest) -> UiMessage:
    candidates = [*body.messages, *([body.message] if body.message else [])]
    for message in reversed(candidates):
        if message.role == "user":
            return message
    raise InvalidRequest("the chat has no user message to reply to")


@router.post(
    "/chat",
    response_class=Response,
    responses={**_STREAM_RESPONSE, **error_responses(400, 401, 404, 409, 413, 429, 503)},
)
async def chat(
    principal: PrincipalDep,
    body: ChatRequest,
    runner: RunnerDep,
    rt: RuntimeDep,
    hub: HubDep,
    limiter: AttachLimiterDep,
    idempotency_key: runs.IdempotencyKey = None,
) -> Response:
    """Send the last user message as a new run of thread `id`; its reply as a UI message stream."""
    thread_id = check_thread_id(body.id)
    message = _last_user_message(body)
    text = "".join(p.text or "" for p in message.parts if p.type == "text")
    if idempotency_key is None and body.trigger == "submit-message":
        key = f"ai-sdk-{message.id}"
        if message.id and re.fullmatch(runs.IDEMPOTENCY_KEY_PATTERN, key):
            idempotency_key = key
    try:
        create = RunCreate.model_validate(
            {
                "input": text,
                "multitask_strategy": body.multitask_strategy,
                "model_options": body.model_options,
                "timeout_s": body.timeout_s,
            }
        )
    except ValidationError as exc:
        raise invalid(exc.errors(), lead="the message cannot be a run") from None
    # The stream's slot first: a run accepted and then refused a stream would run unseen.
    slot = _slot(rt, limiter, principal)
    try:
        accepted = await runs.create_run(
            principal, thread_id, create, runner, rt, Response(), idempotency_key
        )
        tail = await hub.acquire(thread_id, principal.name)
        run = await rt.store.get_run(thread_id, accepted.run_id)
        if run is None:
            raise RunNotFound()
    except BaseException:
        slot.release()
        raise
    return ui_stream_response(rt, hub, tail, slot, run, reader_of(principal), Position(run.run_id))


@router.get(
    "/chat/{thread_id}/stream",
    response_class=Response,
    responses={
        **_STREAM_RESPONSE,
        204: {"description": "The thread has no active run (and no run_id was asked for)"},
        **error_responses(400, 401, 404, 429, 503),
    },
)
async def resume(
    principal: StreamPrincipalDep,
    thread_id: ThreadId,
    rt: RuntimeDep,
    hub: HubDep,
    limiter: AttachLimiterDep,
    run_id: Annotated[str | None, Query(description="This run, even if it has ended")] = None,
    last_event_id_header: LastEventIdHeader = None,
    last_event_id: LastEventIdQuery = None,
) -> Response:
    """The thread's active run (or `run_id`, or the run of Last-Event-ID, from there) as a UI
    message stream."""
    raw = last_event_id_header if last_event_id_header is not None else last_event_id
    parsed = parse(raw)
    reader = reader_of(principal)
    if isinstance(parsed, Position) and parsed.done:
        return Response(status_code=204)
    # Reads filtered by the reader in the statement that reads (no check-then-read window).
    run: Run | None = None
    if run_id is not None and parsed is None:
        run = await rt.store.get_run(thread_id, check_run_id(run_id), reader=reader)
        if run is None:
            raise RunNotFound()
    elif parsed is None:
        run = await rt.store.latest_run(thread_id, reader=reader)
        if run is None:
            # Someone else's thread is 404; one with no run yet has nothing to resume.
            await require_reader(rt, principal, thread_id, ThreadNotFound)
            return Response(status_code=204)
        if not run.active:
            return Response(status_code=204)
    slot, tail = await stream_slot(rt, hub, limiter, principal, thread_id)
    try:
        if run is None:
            where = await place(rt, tail, thread_id, reader, raw)
            run, pos = where.run, where.pos
            if run is None or pos is None:
                raise RunNotFound()
            if where.lost:
                pos = Position(run.run_id, parts=1)  # the encoder starts the reader over
            if pos.done:
                raise _Ended()
        else:
            pos = Position(run.run_id)
    except BaseException as exc:
        hub.release(tail)
        slot.release()
        if isinstance(exc, _Ended):
            return Response(status_code=204)
        raise
    return ui_stream_response(rt, hub, tail, slot, run, reader, pos)


class _Ended(Exception):
    pass


def _slot(rt: RuntimeDep, limiter: AttachLimiter, principal: Principal) -> AttachSlot:
    return limiter.acquire(
        principal.name,
        per_principal=rt.settings.max_attach_per_principal,
        per_pod=rt.settings.max_attach_per_pod,
    )


def ui_stream_response(
    rt: RuntimeDep,
    hub: TailHub,
    tail: ThreadTail,
    slot: AttachSlot,
    run: Run,
    reader: str | None,
    pos: Position,
) -> SseResponse:
    """A run as a UI message stream from the client's place (a fresh one: from the run's
    first event). Its slot and its tail, both acquired by the caller, are held until it
    ends, however it ends."""
    headers = {
        **HEADERS,
        "x-threadgate-thread-id": run.thread_id,
        "x-threadgate-run-id": run.run_id,
    }
    return SseResponse(
        _ui_stream(rt, tail, run, reader, pos),
        slot=slot,
        release=lambda: hub.release(tail),
        media_type="text/event-stream",
        headers=headers,
    )


async def _ui_stream(
    rt: RuntimeDep, tail: ThreadTail, run: Run, reader: str | None, pos: Position
) -> AsyncIterator[bytes]:
    """The run's events from the client's place, encoded. The relay runs in its mode for a
    reader that cannot cut a reply short: any cut starts it over (`reset-step`)."""
    encoder = UiMessageStream(run.thread_id, run.run_id, pos)
    if encoder.restart:
        # A place without the encoder's state (a native or v2 id): the reader starts over.
        yield encoder.reset_first()
        pos = encoder.pos = Position(run.run_id, text="")
    src = sources(rt, tail, run, reader)
    batches = relay(pos, run, src, keepalive_s=rt.settings.keepalive_s, truncate=False)
    async for batch in batches:
        out = encoder.encode(batch)
        if out:
            yield out
        if encoder.finished:
            break
    if encoder.finished:
        yield DONE  # a stream cut before `done` ends without it: the client reconnects
