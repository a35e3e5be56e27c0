"""Deadlines uvicorn does not have: a request's head and its body must arrive in time.

uvicorn (0.54, httptools) times out only an idle keep-alive connection, and any byte that
arrives cancels that timer: a client that opens a connection and sends nothing, or trickles
its headers or a body nobody reads (after a 401 or a 413), held the connection for good.
`guarded_http` is uvicorn's httptools protocol with two deadlines, passed to
`uvicorn.Config(http=...)`:

- the head (request line and headers) within `header_timeout_s` of the request's first byte,
  or of the connection for its first request: else 408 and the connection is closed;
- the body within `body_timeout_s` (+1 s) of the head, whether the app reads it or not: else
  the connection is closed. The app's own deadline (api/limits.RequestGuard, the same
  `body_timeout_s`) answers 408 first when it is the app that waits for the body;
- and a head of at most 64 KiB (431), which httptools does not bound.

tests/multipod/test_slow_clients.py checks both on a `threadgate serve` pod, and fails loudly
if a uvicorn upgrade moves the methods this relies on.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import Settings

BODY_GRACE_S = 1.0  # the app's 408 goes first; this closes what nobody reads
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; httptools sets no bound of its own


def _answer(status: str, code: str, message: str) -> bytes:
    """A whole HTTP answer with the API's JSON error body, for a request no app has seen."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


HEAD_TIMEOUT = _answer("408 Request Timeout", "request_timeout", "the request head was too slow")
HEAD_TOO_LARGE = _answer(
    "431 Request Header Fields Too Large", "headers_too_large", "the request head is too large"
)


def guarded_http(settings: Settings) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the head and body deadlines of `settings`."""
    header_s = settings.header_timeout_s
    body_s = settings.body_timeout_s + BODY_GRACE_S

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _in_head = False
        _head_bytes = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm(header_s, head=True)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_head:  # the connection's first request is timed from its start
                self._arm(header_s, head=True)

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.transport.write(HEAD_TOO_LARGE)
                self.transport.close()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._arm(body_s, head=False)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float, *, head: bool) -> None:
            self._disarm()
            self._in_head = head
            if head:
                self._head_bytes = 0
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self._in_head = False

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self._in_head:
                self.transport.write(HEAD_TIMEOUT)  # no app has seen this request
            self.transport.close()

    return GuardedHttpToolsProtocol
