"""A light HTTP/1.1 + SSE client on asyncio.Protocol, for the benchmarks' client side.

Not httpx: the client shares the machine's two cores with the servers it measures, and at a
thousand streams httpx's per-event cost would be a good part of what we measured. Each read is
stamped with `time.perf_counter()` before any parsing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


BodyCallback = Callable[[float, bytes], None]


class HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; a response body may be streamed to a callback.

    `data_received` stamps each read with `time.perf_counter()` before any parsing, so an
    arrival time is when the bytes reached this process's loop.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._state = "idle"  # idle|head|length|chunk-size|chunk-data|chunk-crlf|chunk-end
        self._remaining = 0
        self._resp: Response | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._on_body: BodyCallback | None = None
        self._head_waiter: asyncio.Future[Response] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> HttpConn:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] # uvloop's is no asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        err = ConnectionError(f"connection lost: {exc!r}")
        for fut in (self._waiter, self._head_waiter):
            if fut is not None and not fut.done():
                fut.set_exception(err)
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        on_body: BodyCallback | None = None,
    ) -> tuple[asyncio.Future[Response], asyncio.Future[Response]]:
        """Write a request; futures for its head and for its complete response."""
        assert self._state == "idle", "one request at a time on a connection"
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter, self._head_waiter = loop.create_future(), loop.create_future()
        self._head_waiter.add_done_callback(_retrieved)  # the full response reports errors
        self._on_body = on_body
        self._state = "head"
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        return self._head_waiter, self._waiter

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        data = None
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        _, done = self.send(method, path, data, hdrs)
        return await done

    # -- parsing
    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._buf += data
        while self._step(now):
            pass

    def _step(self, now: float) -> bool:
        buf = self._buf
        if self._state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[: end + 4]
            status = int(head[0].split()[1])
            headers = {}
            for line in head[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            self._resp = Response(status, headers)
            assert self._head_waiter is not None
            if not self._head_waiter.done():
                self._head_waiter.set_result(self._resp)
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self._state = "chunk-size"
            else:
                self._remaining = int(headers.get("content-length", "0"))
                self._state = "length"
                if status in (204, 304) or self._remaining == 0:
                    self._finish()
            return True
        if self._state == "length":
            if not buf:
                return False
            take = bytes(buf[: self._remaining])
            del buf[: len(take)]
            self._remaining -= len(take)
            self._body(now, take)
            if self._remaining == 0:
                self._finish()
            return True
        if self._state == "chunk-size":
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            del buf[: end + 2]
            if size == 0:
                self._state = "chunk-end"
            else:
                self._remaining, self._state = size, "chunk-data"
            return True
        if self._state == "chunk-data":
            if not buf:
                return False
            take = bytes(buf[: self._remaining])
            del buf[: len(take)]
            self._remaining -= len(take)
            self._body(now, take)
            if self._remaining == 0:
                self._state = "chunk-crlf"
            return True
        if self._state == "chunk-crlf":
            if len(buf) < 2:
                return False
            del buf[:2]
            self._state = "chunk-size"
            return True
        if self._state == "chunk-end":
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            del buf[: end + 2]
            if end == 0:
                self._finish()
            return True
        return False  # idle: stray bytes wait

    def _body(self, now: float, data: bytes) -> None:
        if self._on_body is not None:
            self._on_body(now, data)
        else:
            assert self._resp is not None
            self._resp.body += data

    def _finish(self) -> None:
        self._state = "idle"
        assert self._waiter is not None and self._resp is not None
        if not self._waiter.done():
            self._waiter.set_result(self._resp)


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def get(port: int, path: str) -> Response:
    conn = await HttpConn.open(port)
    try:
        return await conn.request("GET", path)
    finally:
        conn.close()


class SseParser:
    """Feeds on body bytes; calls `on_event(t, event, data, id)` per SSE frame (comments dropped)."""

    def __init__(self, on_event: Callable[[float, str, bytes, str | None], None]) -> None:
        self.on_event = on_event
        self._buf = b""

    def feed(self, t: float, data: bytes) -> None:
        buf = self._buf + data
        if b"\r" in buf:  # CRLF framing (LangGraph's server); a lone trailing CR waits
            buf = buf.replace(b"\r\n", b"\n")
        frames = buf.split(b"\n\n")
        self._buf = frames.pop()
        for frame in frames:
            event, payload, eid = "message", b"", None
            for line in frame.split(b"\n"):
                if line.startswith(b"data: "):
                    payload = line[6:]
                elif line.startswith(b"event: "):
                    event = line[7:].decode()
                elif line.startswith(b"id: "):
                    eid = line[4:].decode()
            if payload:
                self.on_event(t, event, payload, eid)


@dataclass
class Stream:
    """One attached SSE client: the events it got, each with its arrival time."""

    status: int = 0
    events: list[tuple[float, str, bytes]] = field(default_factory=list)
    first_chunk: float | None = None
    done_at: float | None = None
    finished: asyncio.Future[None] | None = None

    def chunks(self) -> list[tuple[float, dict[str, Any]]]:
        return [(t, json.loads(d)) for t, e, d in self.events if e == "chunk"]


async def attach(
    port: int,
    path: str,
    *,
    keep: bool = True,
    on_event: Callable[[float, str, bytes, str | None], None] | None = None,
    method: str = "GET",
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    chunk_event: str = "chunk",
    done_event: str | None = "done",
) -> tuple[Stream, HttpConn]:
    """Open an SSE stream; returns once the response head is in (the stream then runs on).

    The stream is finished at its `done_event` or when the response ends, whichever is first.
    """
    loop = asyncio.get_running_loop()
    stream = Stream(finished=loop.create_future())
    assert stream.finished is not None
    stream.finished.add_done_callback(_retrieved)  # a caller may not wait for the end
    conn = await HttpConn.open(port)

    def event(t: float, ev: str, data: bytes, eid: str | None) -> None:
        if keep:
            stream.events.append((t, ev, data))
        if ev == chunk_event and stream.first_chunk is None:
            stream.first_chunk = t
        if on_event is not None:
            on_event(t, ev, data, eid)
        if ev == done_event:
            stream.done_at = t
            assert stream.finished is not None
            if not stream.finished.done():
                stream.finished.set_result(None)

    parser = SseParser(event)
    hdrs = {"Accept": "text/event-stream", **(headers or {})}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    head, done = conn.send(method, path, data, hdrs, on_body=parser.feed)

    def ended(fut: asyncio.Future[Response]) -> None:
        assert stream.finished is not None
        exc = fut.exception() if not fut.cancelled() else None
        if stream.done_at is None and exc is None:
            stream.done_at = time.perf_counter()
        if not stream.finished.done():
            if exc is not None:
                stream.finished.set_exception(exc)
            else:
                stream.finished.set_result(None)

    done.add_done_callback(ended)
    stream.status = (await head).status
    return stream, conn
