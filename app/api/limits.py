"""Request limits: body size (an ASGI middleware, before any parsing) and concurrent attaches."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PayloadTooLarge, TooManyRequests


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


class BodySizeLimit:
    """413 before the app parses anything: by Content-Length, or by counting streamed bytes.

    A body within the limit is read here and handed to the app whole; the limit is small
    (THREADGATE_MAX_BODY_BYTES) and the app would buffer the JSON body anyway.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY:
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        length = _content_length(scope)
        if length is not None and length > limit:
            await _too_large(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left before sending its body: let the app see the disconnect.
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
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)


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
    err = PayloadTooLarge(f"the request body is larger than {limit} bytes")
    body = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # No `connection: close`: closing with the client's bytes unread resets the
                # connection, and the client may lose this answer. uvicorn discards the rest.
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
