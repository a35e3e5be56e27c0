"""HTTP routes. Only this package knows HTTP: it maps ThreadgateError to JSON errors."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ThreadgateError, TooManyRequests, Unavailable, printable
from .openapi import document_errors
from .validation import invalid

logger = logging.getLogger(__name__)


def install(app: FastAPI) -> None:
    from . import admin, aisdk, attach, health, runs, ui

    app.include_router(runs.router)
    app.include_router(admin.router)
    app.include_router(attach.router)
    app.include_router(aisdk.router)  # the Vercel AI SDK's useChat: /ai-sdk/chat
    app.include_router(health.router)
    ui.install(app)  # the chat page at / and /static/*
    document_errors(app)  # /openapi.json: 400 ErrorBody where FastAPI would say 422

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
        errors = list(exc.errors())
        lead = ""
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors) and not (
            media == "application/json" or media.endswith("+json")
        ):
            # FastAPI reads a body as JSON only under that content type; anything else (curl's
            # -d sends a form) fails as "Input should be a valid dictionary...".
            got = f"got {content_type!r}" if content_type else "none was sent"
            lead = f"the body must be JSON, sent with content-type: application/json ({got})"
            errors = [e for e in errors if tuple(e.get("loc", ()))[:1] != ("body",)]
        err = invalid(errors, lead=lead)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):
            # The router's own answer: say which route (`POST /threads//runs`: an empty id).
            route = f"{request.method} {request.url.path}"[:200]
            message = f"{'no route' if exc.status_code == 404 else 'method not allowed'}: {route}"
        return JSONResponse(
            {"error": {"code": code, "message": printable(message)}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    import psycopg
    from psycopg_pool import PoolTimeout

    @app.exception_handler(PoolTimeout)
    @app.exception_handler(psycopg.OperationalError)
    async def _database_away(request: Request, exc: Exception) -> JSONResponse:
        # PostgreSQL is away (the pool's wait ran out, a connection broke): not a fault of
        # the request nor of ours, so no 500 and no traceback; retry, here or on another pod.
        logger.warning(
            "%s %s: the database is unavailable: %r", request.method, request.url.path, exc
        )
        away = Unavailable("the database is unavailable; retry")
        return JSONResponse(away.body(), status_code=away.status)

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
