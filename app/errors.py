"""The one error hierarchy: every failure the service reports has a stable code and status."""

from __future__ import annotations

from typing import Any


class ThreadgateError(Exception):
    """Base error. `code` is stable and documented; `status` is the HTTP status it maps to."""

    code = "internal"
    status = 500

    def __init__(self, message: str | None = None, **details: Any) -> None:
        super().__init__(message or self.__doc__ or self.code)
        self.message = message or (self.__doc__ or self.code).strip()
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
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
