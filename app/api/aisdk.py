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

from fastapi import APIRouter, Header, Query, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidRequest, RunNotFound, ThreadNotFound
from ..ids import check_run_id, check_thread_id
from ..streams.aisdk import DONE, HEADERS, UiMessageStream
from ..streams.events import Event
from ..streams.relay import relay
from . import runs
from .attach import SseResponse, _event_id
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
from .schemas import RunCreate, Strategy, error_responses

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
        problems = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in exc.errors()]
        raise InvalidRequest("the message cannot be a run", problems=problems) from None
    # The stream's slot first: a run accepted and then refused a stream would run unseen.
    slot = limiter.acquire(
        principal.name,
        per_principal=rt.settings.max_attach_per_principal,
        per_pod=rt.settings.max_attach_per_pod,
    )
    try:
        accepted = await runs.create_run(
            principal, thread_id, create, runner, rt, Response(), idempotency_key
        )
    except BaseException:
        slot.release()
        raise
    headers = {
        **HEADERS,
        "x-threadgate-thread-id": thread_id,
        "x-threadgate-run-id": accepted.run_id,
    }
    return SseResponse(
        _ui_stream(rt, hub, thread_id, accepted.run_id, None),
        slot=slot,
        media_type="text/event-stream",
        headers=headers,
    )


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
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    last_event_id: Annotated[
        str | None, Query(description="Same as the Last-Event-ID header")
    ] = None,
) -> Response:
    """The thread's active run (or `run_id`) as a UI message stream, from its start."""
    after = _event_id(last_event_id_header, last_event_id)
    # The owner check and the read are one statement (`reader`): checked first and read
    # after, a thread created meanwhile by someone else was read as theirs.
    reader = reader_of(principal)
    if run_id is not None:
        run = await rt.store.get_run(thread_id, check_run_id(run_id), reader=reader)
        if run is None:
            await require_reader(rt, principal, thread_id, ThreadNotFound)
            raise RunNotFound()
    else:
        run = await rt.store.latest_run(thread_id, reader=reader)
        if run is None:
            await require_reader(rt, principal, thread_id, ThreadNotFound)
        if run is None or not run.active:
            return Response(status_code=204)
    slot = limiter.acquire(
        principal.name,
        per_principal=rt.settings.max_attach_per_principal,
        per_pod=rt.settings.max_attach_per_pod,
    )
    headers = {**HEADERS, "x-threadgate-thread-id": thread_id, "x-threadgate-run-id": run.run_id}
    return SseResponse(
        _ui_stream(rt, hub, thread_id, run.run_id, after),
        slot=slot,
        media_type="text/event-stream",
        headers=headers,
    )


async def _ui_stream(
    rt: RuntimeDep, hub: HubDep, thread_id: str, run_id: str, after: int | None
) -> AsyncIterator[bytes]:
    # Always from the run's first event: the encoder folds in silently what the client had.
    encoder = UiMessageStream(thread_id, run_id, after=after)
    async for batch in _batches(rt, hub, thread_id, run_id):
        out = encoder.encode(batch)
        if out:
            yield out
        if encoder.finished:
            break
    if encoder.finished:
        yield DONE  # a stream cut before `done` ends without it: the client reconnects


async def _batches(
    rt: RuntimeDep, hub: HubDep, thread_id: str, run_id: str
) -> AsyncIterator[list[Event]]:
    """The relay of one run, from its first event (what api/attach.py's _stream encodes)."""

    async def lookup() -> Any:
        return await rt.store.get_run(thread_id, run_id)

    async with hub.attach(thread_id) as tail:
        async for batch in relay(
            tail, run_id, lookup, last_event_id=None, keepalive_s=rt.settings.keepalive_s
        ):
            yield batch
