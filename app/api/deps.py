"""Annotated dependencies of the routes: the runtime, the caller, thread access, path ids."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth import Principal, authenticate
from ..errors import Forbidden, NotFound, ThreadNotFound, Unauthorized, Unavailable
from ..ids import THREAD_ID_PATTERN, check_thread_id
from ..runtime import Runtime
from ..streams.hub import TailHub
from ..workflows.runner import Runner
from .limits import AttachLimiter


# Every dependency is `async def`: FastAPI runs a plain `def` one in its thread pool, a thread
# hand-off per dependency per request for what is an attribute read.
async def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(runtime)]


async def thread_id_param(
    thread_id: Annotated[
        str,
        Path(
            description="Thread id, ^[A-Za-z0-9_-]{1,128}$",
            # Documented, not enforced here: check_thread_id answers invalid_thread_id.
            json_schema_extra={"pattern": THREAD_ID_PATTERN, "minLength": 1, "maxLength": 128},
        ),
    ],
) -> str:
    return check_thread_id(thread_id)


ThreadId = Annotated[str, Depends(thread_id_param)]


async def runner(rt: RuntimeDep) -> Runner:
    if rt.runner is None or rt.draining:
        raise Unavailable("this pod is not accepting runs (starting or draining)")
    return rt.runner


async def hub(rt: RuntimeDep) -> TailHub:
    if rt.hub is None:
        raise Unavailable("this pod is not ready")
    return rt.hub


RunnerDep = Annotated[Runner, Depends(runner)]
HubDep = Annotated[TailHub, Depends(hub)]


async def attach_limiter(request: Request) -> AttachLimiter:
    limiter: AttachLimiter = request.app.state.attach_limiter
    return limiter


AttachLimiterDep = Annotated[AttachLimiter, Depends(attach_limiter)]


# Declared for OpenAPI (/docs shows "Authorize"); the token itself is read by `authenticate`.
_bearer = HTTPBearer(
    auto_error=False, description="An API key or a JWT; required when authentication is on"
)
BearerDoc = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _caller(rt: Runtime, header: str | None, query_token: str | None) -> Principal:
    principal = authenticate(rt.settings, header, query_token)
    if principal is None:
        # One answer for every failure: no hint whether the token expired, was forged or unknown.
        raise Unauthorized("a valid bearer token is required")
    return principal


async def principal(request: Request, rt: RuntimeDep, _doc: BearerDoc) -> Principal:
    return _caller(rt, request.headers.get("authorization"), None)


async def stream_principal(
    request: Request,
    rt: RuntimeDep,
    _doc: BearerDoc,
    access_token: Annotated[
        str | None,
        Query(description="The bearer token, for EventSource clients that cannot send headers"),
    ] = None,
) -> Principal:
    return _caller(rt, request.headers.get("authorization"), access_token)


PrincipalDep = Annotated[Principal, Depends(principal)]
StreamPrincipalDep = Annotated[Principal, Depends(stream_principal)]


async def admin(principal: PrincipalDep) -> Principal:
    if not principal.admin:
        raise Forbidden("this route is for admin principals (THREADGATE_ADMIN_PRINCIPALS)")
    return principal


AdminDep = Annotated[Principal, Depends(admin)]


def reader_of(principal: Principal) -> str | None:
    """Whose threads a principal reads: None for every thread (admins, and anyone with auth
    off). Reads filter by it in the same statement that reads (no check-then-read window)."""
    return None if principal.admin or principal.anonymous else principal.name


def writer_of(principal: Principal) -> str | None:
    """Whose threads a principal may post to and cancel in: admins only read widely."""
    return None if principal.anonymous else principal.name


async def require_reader(
    rt: Runtime,
    principal: Principal,
    thread_id: str,
    missing: type[NotFound] = ThreadNotFound,
) -> None:
    """Someone else's thread answers like a missing one: 404, never 403."""
    if principal.admin or principal.anonymous:
        return
    owner = await rt.store.thread_owner(thread_id)
    if owner is not None and not principal.may_read(owner):
        raise missing()


async def require_owner(
    rt: Runtime, principal: Principal, thread_id: str, missing: type[NotFound]
) -> None:
    if principal.anonymous:
        return
    owner = await rt.store.thread_owner(thread_id)
    if owner is not None and not principal.may_write(owner):
        raise missing()
