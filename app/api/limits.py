"""Request limits: credential, size and arrival time of a body (an ASGI middleware, before any
parsing), and concurrent attaches."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import authenticate
from ..errors import PayloadTooLarge, ThreadgateError, TooManyRequests, Unauthorized
from ..settings import Settings


@dataclass(slots=True)
class AttachSlot:
    limiter: AttachLimiter
    principal: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self.principal)


class AttachLimiter:
    """Open attach streams on this pod, in total and per principal.

    The anonymous principal of a pod with auth off is one name for every caller, so only the
    pod limit applies to it.
    """

    def __init__(self) -> None:
        self.total = 0
        self.by_principal: Counter[str] = Counter()

    def acquire(self, principal: str, *, per_principal: int, per_pod: int) -> AttachSlot:
        if self.total >= per_pod:
            raise TooManyRequests(f"this pod already serves {per_pod} attach streams")
        if principal and self.by_principal[principal] >= per_principal:
            raise TooManyRequests(f"at most {per_principal} attach streams per principal")
        self.total += 1
        self.by_principal[principal] += 1
        return AttachSlot(self, principal)

    def _release(self, principal: str) -> None:
        self.total -= 1
        self.by_principal[principal] -= 1
        if self.by_principal[principal] <= 0:
            del self.by_principal[principal]


_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


def _has_body(scope: Scope) -> bool:
    """A request that says it has a body. A GET that sends one is guarded like a POST: else
    its answer went out at once and the connection stayed open for a body nobody reads,
    until the server's body deadline (31 s), unauthenticated."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class RequestGuard:
    """What a request must pass before the app reads its body: its credential (401, when
    authentication is on: every route that takes a body needs a bearer token, and so does any
    request that sends one, a GET included), its size (413,
    by Content-Length or by counting streamed bytes) and the time it takes to arrive (408
    after THREADGATE_BODY_TIMEOUT_S).

    A body within the limits is read here and handed to the app whole; the limit is small
    (THREADGATE_MAX_BODY_BYTES) and the app would buffer the JSON body anyway. Settings are
    read per request (tests change them on a running pod).
    """

    def __init__(self, app: ASGIApp, settings: Callable[[], Settings]) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] in _NO_BODY and not _has_body(scope)):
            await self.app(scope, receive, send)
            return
        settings = self.settings()
        if settings.auth_enabled and authenticate(settings, _header(scope), None) is None:
            # Before a byte of the body is read: a client without a credential can no longer
            # hold a connection by trickling one. The same answer as every other 401; the
            # connection is closed rather than kept for a body nobody will read.
            await _answer(send, Unauthorized("a valid bearer token is required"), close=True)
            return
        limit = settings.max_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            await _too_large(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        # The client left before sending its body: let the app see it.
                        await self.app(scope, _replay([message], receive), send)
                        return
                    body = message.get("body", b"")
                    size += len(body)
                    if size > limit:
                        await _too_large(send, limit)
                        return
                    chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            err = RequestTimeout(
                f"the request body did not arrive within {settings.body_timeout_s:g} s"
            )
            await _answer(send, err, close=True)
            return
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)


class RequestTimeout(ThreadgateError):
    """The request took too long to arrive."""

    code = "request_timeout"
    status = 408


def _header(scope: Scope, name: bytes = b"authorization") -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replayed() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    return replayed


async def _too_large(send: Send, limit: int) -> None:
    # No `connection: close`: closing with the client's bytes unread resets the connection,
    # and the client may lose this answer. uvicorn discards the rest (and the server's body
    # deadline, app/server.py, closes a connection whose body never ends).
    await _answer(send, PayloadTooLarge(f"the request body is larger than {limit} bytes"))


async def _answer(send: Send, err: ThreadgateError, *, close: bool = False) -> None:
    """The JSON error body, as the app's exception handlers write it."""
    body = json.dumps(err.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
