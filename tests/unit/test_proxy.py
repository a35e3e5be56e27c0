"""tests/multipod/proxy.py, the round-robin proxy the third-party client tests stand behind:
each new connection goes to the next upstream, a refusing one is skipped, an upstream that
hangs up breaks the client's connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from threadgate.devstack import free_port

from tests.multipod.proxy import RoundRobinProxy, Upstream

pytestmark = pytest.mark.unit


@contextlib.asynccontextmanager
async def named_server(name: str) -> AsyncIterator[tuple[Upstream, list[asyncio.StreamWriter]]]:
    """Answers each request line with its name; its open connections, to cut them."""
    held: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(OSError):
            while await reader.readline():
                writer.write(f"{name}\n".encode())
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield Upstream(name, "127.0.0.1", server.sockets[0].getsockname()[1]), held
    finally:
        server.close()
        for w in held:
            w.transport.abort()


async def ask(port: int) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /threads/t/attach?x=1 HTTP/1.1\r\n")  # one line, one answer
    return (await reader.readline()).decode().strip(), reader, writer


async def test_round_robin_skips_a_dead_upstream_and_breaks_with_its_pod() -> None:
    async with (
        named_server("a") as (a, a_conns),
        named_server("b") as (b, _),
    ):
        dead = Upstream("dead", "127.0.0.1", free_port())
        async with RoundRobinProxy([a, dead, b]) as proxy:
            answers = []
            conns = []
            for _ in range(4):
                name, reader, writer = await ask(proxy.port)
                answers.append(name)
                conns.append((reader, writer))
            # a, (dead: b takes it), b, a
            assert answers == ["a", "b", "b", "a"]
            assert proxy.refused == ["dead"]
            assert [c.pod for c in proxy.connections] == answers
            assert proxy.live("/attach") == answers
            # The upstream hangs up: the client's connection ends too.
            for w in a_conns:
                w.transport.abort()
            for name, (reader, writer) in zip(answers, conns, strict=True):
                if name == "a":
                    async with asyncio.timeout(5):
                        assert await reader.read() == b""
                writer.close()
            async with asyncio.timeout(5):
                while True:
                    if not any(c.open for c in proxy.connections):
                        break
                    await asyncio.sleep(0.01)  # the proxy notices the closes on its own loop
            assert proxy.live("/attach") == []
