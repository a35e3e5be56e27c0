"""A round-robin TCP proxy in front of a cluster's pods: one URL for clients, as behind a load
balancer. Each new connection goes to the next pod; a pod that refuses the connection (dead,
restarting) is skipped for the next one. Bytes are copied as they are: HTTP keep-alive keeps a
connection on its pod, and a pod's death closes the client's side of its connections.

It notes which pod each connection went to and the request lines it saw, so that a test can
find, say, the pod serving a client's stream (`live`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.multipod.cluster import Pod

_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]\r\n")
CONNECT_TIMEOUT_S = 2.0


@dataclass
class Connection:
    """One client connection: the pod it was sent to and the requests it carried."""

    id: int
    pod: str
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    open: bool = True


@dataclass(frozen=True)
class Upstream:
    name: str
    host: str
    port: int


class RoundRobinProxy:
    """`async with RoundRobinProxy(upstreams) as proxy:` — `proxy.url` is the one URL.

    `upstreams` is a list, or a callable giving it anew for each connection (a cluster whose
    members change)."""

    def __init__(self, upstreams: Sequence[Upstream] | Callable[[], Sequence[Upstream]]) -> None:
        self._upstreams = upstreams
        self._turn = 0
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections: list[Connection] = []
        self.refused: list[str] = []  # pods that refused a connection, in order
        self.port = 0

    @classmethod
    def of(cls, pods: Sequence[Pod]) -> RoundRobinProxy:
        """In front of tests/multipod/cluster.py pods (their name and port survive restarts)."""
        return cls([Upstream(p.name, "127.0.0.1", p.port) for p in pods])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RoundRobinProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def live(self, path: str) -> list[str]:
        """The pods holding an open connection whose latest request's path contains `path`."""
        return [
            c.pod for c in self.connections if c.open and c.requests and path in c.requests[-1][1]
        ]

    def pods_for(self, path: str) -> list[str]:
        """Every pod a request whose path contains `path` was sent to, in order."""
        return [c.pod for c in self.connections for _, p in c.requests if path in p]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _connect(
        self,
    ) -> tuple[Upstream, asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The next pod in turn that takes the connection (None: none does)."""
        ups = list(self._upstreams() if callable(self._upstreams) else self._upstreams)
        start, self._turn = self._turn, self._turn + 1
        for i in range(len(ups)):
            up = ups[(start + i) % len(ups)]
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(up.host, up.port), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                self.refused.append(up.name)
                continue
            return up, r, w
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = await self._connect()
        if target is None:
            writer.transport.abort()  # no pod at all: the client sees a connection reset
            return
        up, up_reader, up_writer = target
        conn = Connection(next(self._ids), up.name)
        self.connections.append(conn)

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool
        ) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if upstream and (m := _REQUEST_LINE.match(data)):
                        conn.requests.append((m[1].decode(), m[2].decode()))
                    dst.write(data)
                    await dst.drain()

        to_pod = asyncio.create_task(pipe(reader, up_writer, True))
        to_client = asyncio.create_task(pipe(up_reader, writer, False))
        try:
            # Either side ending ends both: a pod that died mid-response must break the
            # client's response too (a client resumes a broken stream, not a finished one).
            await asyncio.wait({to_pod, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            conn.open = False
            for t in (to_pod, to_client):
                t.cancel()
            for t in (to_pod, to_client):
                with contextlib.suppress(BaseException):
                    await t
            # Closed, not aborted: what was already read from one side still reaches the other.
            for w in (writer, up_writer):
                w.close()
            for w in (writer, up_writer):
                try:
                    await asyncio.wait_for(w.wait_closed(), 5)
                except (OSError, TimeoutError):
                    w.transport.abort()
