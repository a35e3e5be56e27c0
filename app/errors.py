"""The one error hierarchy: every failure the service reports has a stable code and status."""

from __future__ import annotations

from typing import Any

# An echoed string (a message, a detail) is cut at this many characters.
MAX_ECHO_CHARS = 1000


def printable(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` as an answer may echo it: at most `limit` characters, a lone surrogate (which
    no JSON encoder can write as UTF-8) as its escape `\\udXXX`, NUL as `\\x00`."""
    text = text[:limit]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")


def echoable(value: Any) -> Any:
    """A JSON value with every string in it (keys included) made `printable`."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): echoable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [echoable(v) for v in value]
    return value


class ThreadgateError(Exception):
    """Base error. `code` is stable and documented; `status` is the HTTP status it maps to."""

    code = "internal"
    status = 500

    def __init__(self, message: str | None = None, **details: Any) -> None:
        super().__init__(message or self.__doc__ or self.code)
        self.message = message or (self.__doc__ or self.code).strip()
        self.details = details

    def body(self) -> dict[str, Any]:
        """The JSON error body. Messages and details may echo what a client sent: made
        `printable`, so that no answer fails to encode (a 500 in place of the 4xx)."""
        error: dict[str, Any] = {"code": self.code, "message": printable(self.message)}
        if self.details:
            error["details"] = echoable(self.details)
        return {"error": error}


class ConfigError(ThreadgateError):
    """The pod's configuration is invalid."""

    code = "config"


class InvalidRequest(ThreadgateError):
    """The request is malformed."""

    code = "invalid_request"
    status = 400


class InvalidThreadId(InvalidRequest):
    """Thread ids match ^[A-Za-z0-9_-]{1,128}$."""

    code = "invalid_thread_id"


class InvalidCursor(InvalidRequest):
    """cursor must be a next_cursor this route gave."""

    code = "invalid_cursor"


class Unauthorized(ThreadgateError):
    """A valid credential is required."""

    code = "unauthorized"
    status = 401


class Forbidden(ThreadgateError):
    """This principal may not do that."""

    code = "forbidden"
    status = 403


class NotFound(ThreadgateError):
    """No such resource."""

    code = "not_found"
    status = 404


class ThreadNotFound(NotFound):
    """No such thread."""

    code = "thread_not_found"


class RunNotFound(NotFound):
    """No such run on this thread."""

    code = "run_not_found"


class Conflict(ThreadgateError):
    """The request conflicts with the current state."""

    code = "conflict"
    status = 409


class ThreadBusy(Conflict):
    """The thread has an active run and multitask_strategy is reject."""

    code = "thread_busy"


class IdempotencyMismatch(Conflict):
    """This Idempotency-Key was used with a different request body."""

    code = "idempotency_mismatch"


class RunFinished(Conflict):
    """The run has already finished."""

    code = "run_finished"


class PayloadTooLarge(ThreadgateError):
    """The request body is too large."""

    code = "payload_too_large"
    status = 413


class TooManyRequests(ThreadgateError):
    """A limit was reached; retry later."""

    code = "too_many_requests"
    status = 429
    retry_after = 1  # seconds, the answer's Retry-After


class QuotaExceeded(TooManyRequests):
    """A principal's quota is used up. The code names the quota (`quota_runs_per_day`,
    `quota_threads`, `quota_stored_bytes`); Retry-After says when it may have room again."""

    def __init__(self, quota: str, message: str, *, retry_after: int, **details: Any) -> None:
        super().__init__(message, quota=quota, **details)
        self.code = f"quota_{quota}"
        self.retry_after = retry_after


class Unavailable(ThreadgateError):
    """A dependency is unavailable or the pod is draining; retry on another pod."""

    code = "unavailable"
    status = 503


class ModelError(ThreadgateError):
    """The model provider failed."""

    code = "model_error"
    transient = False


class TransientModelError(ModelError):
    """The model provider failed in a way worth retrying (timeout, reset, 429, 5xx)."""

    code = "model_transient"
    transient = True


class PermanentModelError(ModelError):
    """The model provider refused the request (4xx, bad configuration)."""

    code = "model_permanent"


class InvalidDataEvent(PermanentModelError):
    """The reply source sent a data event that breaks the contract (name, JSON, size)."""

    code = "invalid_data_event"


class StreamUnavailable(ThreadgateError):
    """JetStream did not acknowledge in time."""

    code = "stream_unavailable"
    status = 503
