"""Routes of runs and messages: POST a run, read its status, list, cancel, the conversation."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from .. import tracing
from ..errors import InvalidCursor, InvalidRequest, RunNotFound, ThreadNotFound
from ..ids import check_run_id
from ..sources import check_options
from ..store import pages
from ..workflows.runner import RunRequest, wait_until_stopped
from .deps import (
    PrincipalDep,
    RunnerDep,
    RuntimeDep,
    ThreadId,
    reader_of,
    require_reader,
    writer_of,
)
from .pages import (
    decode_cursor,
    message_cursor,
    messages_page,
    page_limit,
    run_answer,
    run_cursor,
    runs_page,
)
from .responses import SafeJSONResponse
from .schemas import (
    MessageList,
    RunAccepted,
    RunCreate,
    RunList,
    RunOut,
    error_responses,
)

router = APIRouter(tags=["runs"])

# Printable ASCII, no space at either end (HTTP strips it); checked in create_run.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]([ -~]{0,253}[!-~])?$"
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Retry-safe key, scoped to the thread: 1 to 255 printable ASCII characters",
        json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
    ),
]


@router.post(
    "/threads/{thread_id}/runs",
    status_code=202,
    response_model=RunAccepted,
    responses={
        200: {"model": RunAccepted, "description": "An idempotent repeat"},
        **error_responses(400, 401, 404, 409, 413, 429, 503),
    },
)
async def create_run(
    principal: PrincipalDep,
    thread_id: ThreadId,
    body: RunCreate,
    runner: RunnerDep,
    rt: RuntimeDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
    # W3C trace context of a client that traces (app/tracing.py): the run's trace continues it.
    traceparent: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> RunAccepted:
    """Accept a message and reply to it as a durable run; attach to watch the reply stream."""
    if len(body.input) > rt.settings.max_input_chars:
        raise InvalidRequest(f"input is longer than {rt.settings.max_input_chars} characters")
    if body.timeout_s is not None and body.timeout_s > rt.settings.run_timeout_s:
        # Refused, not clamped: a client that asks for longer learns the server's bound.
        raise InvalidRequest(
            f"timeout_s must be at most {rt.settings.run_timeout_s:g}"
            " (the server's THREADGATE_RUN_TIMEOUT_S)"
        )
    if idempotency_key is not None and not re.fullmatch(IDEMPOTENCY_KEY_PATTERN, idempotency_key):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 printable ASCII characters")
    check_options(rt.source, body.model_options)  # each source checks its own options
    with tracing.accepting(thread_id, {"traceparent": traceparent} if traceparent else {}):
        run, created = await runner.submit(
            thread_id,
            RunRequest(body.input, body.multitask_strategy, body.model_options, body.timeout_s),
            idempotency_key=idempotency_key,
            owner=None if principal.anonymous else principal.name,
        )
    if created:
        rt.metrics.runs_accepted.inc()
    else:
        response.status_code = 200
    return RunAccepted(run_id=run.run_id, thread_id=run.thread_id, status=run.status)


@router.get(
    "/threads/{thread_id}/runs/{run_id}",
    response_model=RunOut,
    responses=error_responses(400, 401, 404),
)
async def get_run(
    principal: PrincipalDep, thread_id: ThreadId, run_id: str, rt: RuntimeDep
) -> Response:
    """A run's status, attempt, executor and (when finished) its output or error."""
    # Read as a page of one: the reply's output streamed, its parts not read at all.
    head = await pages.run_head(rt.db, thread_id, check_run_id(run_id), reader=reader_of(principal))
    if head is None:
        raise RunNotFound()
    return run_answer(rt.db, head)


PageLimit = Annotated[
    int | None,
    Query(
        ge=1,
        description="Items in the page: THREADGATE_PAGE_LIMIT_DEFAULT (50) when not given, at"
        " most THREADGATE_PAGE_LIMIT_MAX (200)",
    ),
]
PageCursor = Annotated[
    str | None,
    Query(max_length=200, description="The page after this one: a next_cursor it gave"),
]


@router.get(
    "/threads/{thread_id}/runs",
    response_model=RunList,
    responses=error_responses(400, 401, 404),
)
async def list_runs(
    principal: PrincipalDep,
    thread_id: ThreadId,
    rt: RuntimeDep,
    limit: PageLimit = None,
    cursor: PageCursor = None,
    before: Annotated[
        int | None,
        Query(ge=1, le=2**63 - 1, deprecated=True, description="Use cursor (next_before)"),
    ] = None,
) -> Response:
    """The thread's runs, newest first, a page at a time (`next_cursor`)."""
    size = page_limit(rt.settings, limit)
    if cursor is not None:
        (before,) = decode_cursor("r1", cursor, 1)
    heads = await pages.run_heads(
        rt.db, thread_id, limit=size + 1, before=before, reader=reader_of(principal)
    )
    if not heads:
        await require_reader(rt, principal, thread_id, ThreadNotFound)
    more = len(heads) > size
    heads = heads[:size]
    return runs_page(
        rt.db,
        heads,
        run_cursor(heads[-1]) if more else None,
        heads[-1].seq if more else None,
    )


@router.post(
    "/threads/{thread_id}/runs/{run_id}/cancel",
    response_model=RunOut,
    response_class=SafeJSONResponse,
    responses=error_responses(400, 401, 404, 409, 503),
)
async def cancel_run(
    principal: PrincipalDep,
    thread_id: ThreadId,
    run_id: str,
    runner: RunnerDep,
    rt: RuntimeDep,
    wait: Annotated[bool, Query(description="Answer once the run has stopped")] = False,
    timeout: Annotated[float, Query(gt=0, le=300)] = 30.0,
) -> RunOut:
    """Cancel a queued or running run, from any pod: it stops within one chunk."""
    run = await runner.cancel(thread_id, check_run_id(run_id), writer=writer_of(principal))
    if wait:
        run = await wait_until_stopped(rt.store, thread_id, run_id, timeout)
    return RunOut.of(run)


@router.get(
    "/threads/{thread_id}/messages",
    response_model=MessageList,
    responses=error_responses(400, 401, 404),
)
async def list_messages(
    principal: PrincipalDep,
    thread_id: ThreadId,
    rt: RuntimeDep,
    limit: PageLimit = None,
    cursor: PageCursor = None,
) -> Response:
    """The conversation, newest message first, a page at a time (`next_cursor`): each run's
    reply (once stored) then its user message, and so on back."""
    size = page_limit(rt.settings, limit)
    before = None
    if cursor is not None:
        seq, order = decode_cursor("m1", cursor, 2)
        if order > 1:
            raise InvalidCursor()
        before = (seq, order)
    heads = await pages.message_heads(
        rt.db, thread_id, limit=size + 1, before=before, reader=reader_of(principal)
    )
    if not heads:
        await require_reader(rt, principal, thread_id, ThreadNotFound)
    more = len(heads) > size
    heads = heads[:size]
    return messages_page(rt.db, thread_id, heads, message_cursor(heads[-1]) if more else None)
