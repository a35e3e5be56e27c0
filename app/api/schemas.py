"""Request and response bodies of the HTTP API (what /docs shows)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..store.runs import Run

Strategy = Literal["enqueue", "reject", "interrupt"]

# Every option of the mock model (app/models/mock.py), as /docs shows it; a unit test keeps
# this list and the mock's own in step.
MOCK_OPTION_DOCS = {
    "chunks": "how many chunks (default THREADGATE_MOCK_CHUNKS, 20; at most 100000)",
    "delay_ms": "milliseconds before each chunk (default THREADGATE_MOCK_DELAY_MS, 50; 0-60000)",
    "fail": '"transient" (retried) or "permanent" (the run ends `error`) at chunk `fail_at`',
    "fail_at": "the chunk index where `fail` strikes (default 0)",
    "fail_attempts": "`fail` strikes on the first n attempts only (default: every attempt)",
    "vary": "true: chunk i of attempt a reads `chunk-{i}.{a} `, so any mix of attempts shows",
    "data_every": "every n-th part is a data event `tick` {i, attempt}",
    "refuse_continue": "true: after a crash the reply is regenerated (a `reset`), not continued",
}
MOCK_OPTIONS_DOC = "The mock model (THREADGATE_MODEL=mock, the default) takes: " + "; ".join(
    f"`{name}`: {text}" for name, text in MOCK_OPTION_DOCS.items()
)


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="The user's message", min_length=1)
    multitask_strategy: Strategy = Field(
        default="enqueue",
        description="When the thread already has a run: wait for it (enqueue), refuse with 409"
        " (reject), or stop it and run this one next (interrupt)",
    )
    model_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the reply source, checked by it (400 for an unknown key or a"
        " bad value). " + MOCK_OPTIONS_DOC,
        examples=[{"chunks": 200, "delay_ms": 50, "vary": True}],
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=86_400,
        description="End the run with error `timeout` after this long (default from settings)",
    )

    @field_validator("model_options")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_storable_json(value, "model_options")
        return value

    @field_validator("input")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("input must not be blank")
        _check_text(value, "input")
        return value


MAX_JSON_DEPTH = 32


def check_storable_json(value: Any, where: str) -> None:
    """Refuse what PostgreSQL jsonb cannot hold (NUL, lone surrogates, NaN and Infinity, which
    Python's JSON parser takes, as it turns 1e400 into inf) or nests absurdly deep.

    Iterative, so a deep document cannot exhaust Python's recursion either.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, where)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where} must hold finite numbers only (no NaN, no Infinity)")


def _check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise ValueError(f"{where} must not contain NUL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} must be valid Unicode (no lone surrogates)") from None


class RunAccepted(BaseModel):
    run_id: str
    thread_id: str
    status: str


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable: invalid_request, thread_busy, run_not_found, ...")
    message: str = Field(description="For people; a 400 names each field and rule")
    details: dict[str, Any] | None = Field(
        default=None,
        description="More, by error: a 400's `problems`, each {loc, field, rule, msg, limits?}",
    )


class RunOut(BaseModel):
    run_id: str
    thread_id: str
    status: str
    attempt: int
    executor: str | None = Field(description="POD_NAME running or last running the run")
    accepted_by: str
    multitask_strategy: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    output: str | None = None
    error: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Each attempt: {attempt, executor, kind: first|replay|retry, resume_from?}"
        " (resume_from: it continued the reply after that many parts instead of regenerating)",
    )

    @classmethod
    def of(cls, run: Run) -> RunOut:
        return cls(
            run_id=run.run_id,
            thread_id=run.thread_id,
            status=run.status,
            attempt=run.attempt,
            executor=run.executor,
            accepted_by=run.accepted_by,
            multitask_strategy=run.multitask_strategy,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
            output=run.output,
            error=run.error,
            attempts=run.attempts,
        )


class RunList(BaseModel):
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next (older) page; null on the last page"
    )
    next_before: int | None = Field(description="Deprecated: ?before= of the next page")
    runs: list[RunOut] = Field(description="Newest first")


class MessageOut(BaseModel):
    run_id: str
    role: Literal["user", "assistant"]
    status: str
    created_at: datetime
    content: str = Field(description="The message's text")
    parts: list[dict[str, Any]] | None = Field(
        description='The reply in order when it has data parts: {"type": "text", "text"} and'
        ' {"type": "data", "name", "payload"}; null for a text-only message (its content is'
        " the whole of it)"
    )


class MessageList(BaseModel):
    thread_id: str
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next (older) page; null on the last page"
    )
    messages: list[MessageOut] = Field(
        description="Newest first: a run's reply, then its user message, then the run before"
    )


class ErrorBody(BaseModel):
    error: ErrorInfo


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer (all share one body)."""
    return {code: {"model": ErrorBody} for code in codes}
