"""Slow clients (issue 20, item 6): a body is not read before its credential is checked, and
what is read must arrive within THREADGATE_BODY_TIMEOUT_S.

Before: 300 connections trickling a 256 KiB body one byte per 5 s all stayed open, each
buffered before the app authenticated it. Header and idle deadlines belong to the server
(`threadgate serve`): tests/multipod/test_slow_clients.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import unique
from tests.integration.conftest import Pod
from tests.integration.knobs import AUTH_ON, KEYS, key, pod_settings

pytestmark = pytest.mark.integration

UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "a valid bearer token is required"}}


async def raw_post(
    pod: Pod, path: str, head: dict[str, str], body: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a POST's head (and `body`, maybe less than its Content-Length) on a new socket."""
    host, port = pod.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in head.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers and body of the answer, and whether the pod closed the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    try:
        closed = await reader.read(1) == b""
    except ConnectionResetError:
        closed = True  # a trickling client's next byte met the closed socket
    return int(status_line.split()[1]), headers, body, closed


async def test_a_body_is_not_read_before_its_credential_is_checked(pod: Pod) -> None:
    """A client without a valid token announces a body and sends a few bytes of it: it used
    to be read (and waited for) before authentication. Now 401 at once, the same answer as
    any other 401, and the connection is closed."""
    with pod_settings(pod, **AUTH_ON):
        clients = []
        for head in (
            {},
            {"Authorization": "Bearer not-a-key"},
            {"Authorization": f"Basic {KEYS['alice']}"},
        ):
            for framing in ({"Content-Length": "262144"}, {"Transfer-Encoding": "chunked"}):
                for _ in range(50):
                    clients.append(
                        await raw_post(
                            pod,
                            f"/threads/{unique()}/runs",
                            {"Content-Type": "application/json", **head, **framing},
                            b'5\r\n{"inp\r\n' if "Transfer-Encoding" in framing else b'{"inp',
                        )
                    )
        # Every POST route, before its path is even matched.
        for path in ("/threads/x/runs/y/cancel", "/admin/stranded/adopt", "/ai-sdk/chat"):
            clients.append(await raw_post(pod, path, {"Content-Length": "100"}))

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
            try:
                async with asyncio.timeout(20):
                    status, headers, body, closed = await read_answer(reader)
            finally:
                writer.close()
            assert status == 401, status
            assert json.loads(body) == UNAUTHORIZED
            assert headers["www-authenticate"] == "Bearer"
            return closed

        closed = await asyncio.gather(*(answer(r, w) for r, w in clients))
        # The rest of a body nobody will read is not waited for.
        assert closed == [True] * len(clients)
        print(f"\n{len(clients)} unauthenticated slow bodies: 401 and closed")


async def test_a_slow_body_is_408(pod: Pod) -> None:
    """An authenticated body that does not arrive within THREADGATE_BODY_TIMEOUT_S: 408, and
    the connection is closed."""
    with pod_settings(pod, **AUTH_ON, body_timeout_s=0.5):
        thread = unique()
        trickling = [
            await raw_post(
                pod,
                f"/threads/{thread}/runs",
                {"Content-Type": "application/json", "Content-Length": "1000", **key("alice")},
                b'{"input": "',
            )
            for _ in range(50)
        ]

        async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
            answer = asyncio.ensure_future(read_answer(reader))
            try:
                async with asyncio.timeout(20):
                    while not answer.done():
                        try:
                            writer.write(b"x")  # one byte at a time, never the whole body
                            await writer.drain()
                        except ConnectionError:
                            # The pod answered and closed between our check and this byte
                            # (a busy machine widens that window): its answer is read below.
                            pass
                        await asyncio.wait([answer], timeout=0.1)
                    status, _headers, body, closed = await answer
            finally:
                writer.close()
            assert json.loads(body)["error"]["code"] == "request_timeout"
            assert closed
            return status

        statuses = await asyncio.gather(*(trickle(r, w) for r, w in trickling))
        assert statuses == [408] * len(trickling)
        runs = await pod.http.get(f"/threads/{thread}/runs", headers=key("alice"))
        assert runs.json()["runs"] == []
        # A body that arrives in time is accepted as ever.
        ok = await pod.http.post(
            f"/threads/{thread}/runs",
            json={"input": "x", "model_options": {"chunks": 1}},
            headers=key("alice"),
        )
        assert ok.status_code == 202
