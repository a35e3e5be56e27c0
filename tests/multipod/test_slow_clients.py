"""Slow clients against a `threadgate serve` pod (issue 20, item 6): connections that send
nothing, trickle their headers or a body nobody reads are closed after their deadline; a slow
reply stream and an idle keep-alive connection are not.

Before: 300 connections trickling a 256 KiB body one byte per 5 s all stayed open; uvicorn
times out only idle keep-alive connections, and any byte that arrives resets that timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter

import httpx
import pytest

from tests.conftest import unique
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod

KEY = "slow-key-3e9d"
CONNECTIONS = 100  # of each kind
DEADLINE_S = 1.0  # THREADGATE_HEADER_TIMEOUT_S and THREADGATE_BODY_TIMEOUT_S
WAIT_S = 20.0  # how long a test waits for the pod to close a connection


async def until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trickle: bytes | None
) -> tuple[int | None, str | None]:
    """Keep the connection (writing `trickle` a byte at a time) until the pod closes it; its
    last answer's status and error code, if it answered."""
    got = b""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                if trickle:
                    with contextlib.suppress(ConnectionError):
                        writer.write(trickle[:1])
                        trickle = trickle[1:] or trickle
                        await writer.drain()
                try:
                    data = await asyncio.wait_for(reader.read(65536), 0.2)
                except TimeoutError:
                    continue  # still open: trickle on
                except ConnectionError:
                    break  # closed (a trickled byte met the closed socket)
                if not data:
                    break
                got += data
    finally:
        writer.close()
    if not got:
        return None, None
    head, _, body = got.rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n\r\n")
    status = int(head.split()[0])
    code = json.loads(body)["error"]["code"] if body.startswith(b"{") else None
    return status, code


async def test_slow_and_silent_connections_are_closed(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(
        size=1,
        auth="on",
        api_keys=f"slow:{KEY}",
        header_timeout_s=DEADLINE_S,
        body_timeout_s=DEADLINE_S,
    )
    pod = cluster.pods[0]
    host, port = "127.0.0.1", pod.port
    thread = unique()

    def post_head(length: int, token: str | None) -> bytes:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        return (
            f"POST /threads/{thread}/runs HTTP/1.1\r\nHost: {host}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        ).encode()

    kinds: dict[str, tuple[bytes, bytes | None]] = {
        # what is sent at once, what is then trickled a byte per 0.2 s
        "silent": (b"", None),
        "trickled head": (b"", f"GET /threads/{thread}/runs HTTP/1.1\r\nHost: x\r\n".encode()),
        "trickled body, no credential": (post_head(262144, None), b"x"),
        "trickled body": (post_head(262144, KEY) + b'{"input": "', b"x"),
        "body beyond the limit, trickled": (post_head(10**9, KEY), b"x"),
        "head beyond 64 KiB": (
            f"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {'a' * 70_000}\r\n\r\n".encode(),
            None,
        ),
    }

    async def one(kind: str) -> tuple[str, int | None, str | None]:
        first, trickle = kinds[kind]
        reader, writer = await asyncio.open_connection(host, port)
        if first:
            with contextlib.suppress(ConnectionError):  # a head too large is cut short
                writer.write(first)
                await writer.drain()
        status, code = await until_closed(reader, writer, trickle)
        return kind, status, code

    results = await asyncio.gather(*(one(k) for k in kinds for _ in range(CONNECTIONS)))
    answers: dict[str, Counter[tuple[int | None, str | None]]] = {k: Counter() for k in kinds}
    for kind, status, code in results:
        answers[kind][(status, code)] += 1
    print(f"\n{len(results)} slow connections, all closed by the pod; answers: {answers}")
    n = CONNECTIONS
    assert answers["silent"] == {(408, "request_timeout"): n}
    assert answers["trickled head"] == {(408, "request_timeout"): n}
    assert answers["trickled body, no credential"] == {(401, "unauthorized"): n}
    assert answers["trickled body"] == {(408, "request_timeout"): n}
    assert answers["body beyond the limit, trickled"] == {(413, "payload_too_large"): n}
    assert answers["head beyond 64 KiB"] == {(431, "headers_too_large"): n}

    # Nothing of it became a run; a reply slower than the deadlines is not cut, and a
    # keep-alive connection idle for longer than them still serves its next request.
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(
        base_url=pod.url, headers=headers, timeout=30, limits=limits
    ) as http:
        assert (await http.get(f"/threads/{thread}/runs")).json()["runs"] == []
        resp = await http.post(
            f"/threads/{thread}/runs",
            json={"input": "slow", "model_options": {"chunks": 15, "delay_ms": 200}},
        )
        assert resp.status_code == 202, resp.text
        text = ""
        async with http.stream("GET", f"/threads/{thread}/attach") as stream:
            async for chunk in stream.aiter_text():
                text += chunk
        assert text.count("event: chunk") == 15 and "event: done" in text
        assert (await http.get(f"/threads/{thread}/runs")).status_code == 200  # same socket


async def test_a_get_whose_body_never_ends_is_closed_as_fast_as_a_post(
    start_cluster: StartCluster,
) -> None:
    """With the default deadlines (30 s for a body): a request that announces a body and sends
    none, without a credential, is answered 401 and closed at once, a GET (or HEAD, OPTIONS,
    on a public route too) as a POST. A GET used to be held until the body deadline, 31 s."""
    cluster = await start_cluster(size=1, auth="on", api_keys=f"slow:{KEY}")
    pod = cluster.pods[0]
    heads = {
        f"{method} {path}": f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        for method, path in [
            ("POST", "/threads/t1/runs"),
            ("GET", "/threads/t1/runs"),
            ("GET", "/healthz"),
            ("HEAD", "/threads/t1/messages"),
            ("OPTIONS", "/threads/t1/runs"),
        ]
    }

    async def one(head: str) -> tuple[float, int | None, str | None]:
        reader, writer = await asyncio.open_connection("127.0.0.1", pod.port)
        started = asyncio.get_running_loop().time()
        writer.write(head.encode())
        await writer.drain()
        status, code = await until_closed(reader, writer, None)
        return asyncio.get_running_loop().time() - started, status, code

    results = dict(zip(heads, await asyncio.gather(*(one(h) for h in heads.values())), strict=True))
    print("\n" + "; ".join(f"{k}: {s} after {t:.2f}s" for k, (t, s, _) in results.items()))
    for kind, (took, status, code) in results.items():
        assert status == 401 and code in ("unauthorized", None), (kind, status, code)
        # Closed by the pod well before the 30 s body deadline (a loose bound: a busy machine).
        assert took < 5, (kind, took)
