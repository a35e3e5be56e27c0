"""HTTP routes. Only this package knows HTTP: it maps ThreadgateError to JSON errors."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidRequest, ThreadgateError, TooManyRequests, printable


def install(app: FastAPI) -> None:
    from . import admin, aisdk, attach, health, runs, ui

    app.include_router(runs.router)
    app.include_router(admin.router)
    app.include_router(attach.router)
    app.include_router(aisdk.router)  # the Vercel AI SDK's useChat: /ai-sdk/chat
    app.include_router(health.router)
    ui.install(app)  # the chat page at / and /static/*

    @app.exception_handler(ThreadgateError)
    async def _threadgate_error(request: Request, exc: ThreadgateError) -> JSONResponse:
        headers = {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, TooManyRequests):
            headers["Retry-After"] = str(exc.retry_after)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")}
            for e in exc.errors()
        ]
        message = "request body or parameters are invalid"
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if any(p["loc"][:1] == ["body"] for p in problems) and not (
            media == "application/json" or media.endswith("+json")
        ):
            # FastAPI reads a body as JSON only under that content type; anything else (curl's
            # -d sends a form) fails as "Input should be a valid dictionary...".
            got = f"got {content_type!r}" if content_type else "none was sent"
            message = f"the body must be JSON, sent with content-type: application/json ({got})"
        err = InvalidRequest(message, problems=problems)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": {"code": code, "message": printable(str(exc.detail))}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Still logged with its traceback by the server; the client learns nothing internal.
        return JSONResponse(ThreadgateError("internal error").body(), status_code=500)

    _install_limits(app)


def _install_limits(app: FastAPI) -> None:
    from ..auth import check_config
    from .limits import AttachLimiter, RequestGuard

    check_config(app.state.runtime.settings)  # bad key files fail the start, not a request
    app.state.attach_limiter = AttachLimiter()
    # Settings are read per request (tests flip them on a running pod).
    app.add_middleware(RequestGuard, settings=lambda: app.state.runtime.settings)
