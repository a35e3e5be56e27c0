"""A client that stops reading costs the pod nothing that grows: it is paused, not buffered for.

Attach fans a thread's shared log out by cursor (app/streams/tail.py, relay.py). A stalled
client's generator waits on the socket (uvicorn's flow control), so what the pod holds for it
is the transport's write buffer — bounded by the high-water mark plus one write — while the
run goes on into the shared log. When the client reads again it gets every event, in order.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from threadgate.client import Reply, SseEvent, parse_sse
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration

CHUNKS = 4_000  # ~520 KB of SSE: several times what the socket buffers pinned below hold
SOCKET_BUFFER = 8 * 1024
# asyncio's default high-water mark (64 KiB) plus one relay write (at most 64 KiB + one frame).
BOUND = 192 * 1024


def server_protocol(port: int) -> Any:
    """The pod's uvicorn protocol object serving the connection from local port `port`."""
    servers = [o for o in gc.get_objects() if isinstance(o, uvicorn.Server)]
    for server in servers:
        for proto in server.server_state.connections:
            if proto.client and proto.client[1] == port:
                return proto
    return None


async def stalled_attach(pod: Pod, thread: str) -> tuple[socket.socket, Any]:
    host, port = pod.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    local_port = sock.getsockname()[1]
    async with asyncio.timeout(5):
        while (proto := server_protocol(local_port)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    # Pin the pod's side too: otherwise the kernel would absorb megabytes for the client.
    proto.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER
    )
    request = f"GET /threads/{thread}/attach HTTP/1.1\r\nHost: {host}\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock, proto


async def read_all(sock: socket.socket, proto: Any, peak: list[int]) -> bytes:
    """Read the whole response (it ends after the run's `done`: chunked encoding's last, empty
    chunk), slowly, noting the pod's write buffer as it drains. (Stopping at the first bytes
    of `event: done` could cut that event in two, on a busy machine: seen once.)"""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while not data.endswith(b"\r\n0\r\n\r\n"):
        peak.append(proto.transport.get_write_buffer_size())
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)
        assert chunk, "the pod closed the stream before `done`"
        data += chunk
        if len(data) % (256 * 1024) < 4096:
            await asyncio.sleep(0.001)  # a slow reader, not a stopped one
    return bytes(data)


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked transfer-encoding body (possibly cut after its last chunk)."""
    out = bytearray()
    i = 0
    while (j := body.find(b"\r\n", i)) >= 0:
        size = int(body[i:j], 16)
        if size == 0:
            break
        out += body[j + 2 : j + 2 + size]
        i = j + 2 + size + 2
    return bytes(out)


async def events_of(raw: bytes) -> list[SseEvent]:
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()

    async def lines() -> AsyncIterator[str]:
        for line in dechunk(body).decode().split("\n"):
            yield line

    return [ev async for ev in parse_sse(lines())]


async def test_stalled_client_does_not_grow_the_pod(pod: Pod) -> None:
    thread = unique()
    run = await pod.client.post(thread, "big", model_options={"chunks": CHUNKS, "delay_ms": 0})
    sock, proto = await stalled_attach(pod, thread)
    try:
        peak_stalled = 0
        async with asyncio.timeout(90):
            while True:
                peak_stalled = max(peak_stalled, proto.transport.get_write_buffer_size())
                status = (await pod.client.run(thread, run["run_id"]))["status"]
                if status == "success":
                    break
                await asyncio.sleep(0.05)  # the sampling clock of the write buffer
        peak_stalled = max(peak_stalled, proto.transport.get_write_buffer_size())
        # The run is over and the client has read nothing: the whole reply is in the tail,
        # and what the pod holds for the client stays under the bound.
        assert pod.runtime.hub is not None
        view = pod.runtime.hub.tails[thread].view(run["run_id"])
        assert view is not None and view.total == CHUNKS
        assert peak_stalled <= BOUND, peak_stalled
        # Now read it all, slowly: the buffer drains in bounded writes, nothing is lost.
        peak: list[int] = []
        raw = await read_all(sock, proto, peak)
        assert max(peak) <= BOUND, max(peak)
    finally:
        sock.close()
    reply = Reply()
    for ev in await events_of(raw):
        reply.apply(ev)
    assert reply.status == "success"
    assert len(reply.chunks) == CHUNKS
    assert reply.text == mock_reply(CHUNKS)
