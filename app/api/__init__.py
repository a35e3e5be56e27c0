"""HTTP routes. Only this package knows HTTP: it maps ThreadgateError to JSON errors."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import InvalidRequest, ThreadgateError


def install(app: FastAPI) -> None:
    from app.api import admin, attach, health, runs, ui

    app.include_router(runs.router)
    app.include_router(admin.router)
    app.include_router(attach.router)
    app.include_router(health.router)
    ui.install(app)  # the chat page at / and /static/*

    @app.exception_handler(ThreadgateError)
    async def _threadgate_error(request: Request, exc: ThreadgateError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")}
            for e in exc.errors()
        ]
        err = InvalidRequest("request body or parameters are invalid", problems=problems)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail)}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
