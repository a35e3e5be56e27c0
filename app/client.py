"""A Python client of threadgate that never shows a duplicate.

`attach` applies `reset` (drops the partial reply of a dead attempt) and, when the connection
drops, reconnects with `Last-Event-ID` — to the same URL or the next of several pods — so the
caller sees each reply exactly once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(slots=True)
class SseEvent:
    event: str
    data: dict[str, Any]
    id: str | None = None


@dataclass(slots=True)
class Reply:
    """A run's reply as a client reconstructs it: chunks of the current attempt only."""

    run_id: str | None = None
    attempt: int = 0
    chunks: dict[int, str] = field(default_factory=dict)
    resets: int = 0
    status: str | None = None
    error: dict[str, Any] | None = None
    events: list[SseEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.chunks[i] for i in sorted(self.chunks))

    def apply(self, ev: SseEvent) -> str | None:
        """Fold one event in; returns new text to show, if any."""
        self.events.append(ev)
        d = ev.data
        self.run_id = d.get("run_id", self.run_id)
        if ev.event == "reset":
            self.chunks.clear()
            self.resets += 1
            self.attempt = int(d.get("attempt", self.attempt))
        elif ev.event == "run_started":
            self.run_id = d["run_id"]
            if int(d["attempt"]) != self.attempt:
                self.chunks.clear()
            self.attempt = int(d["attempt"])
        elif ev.event == "chunk":
            index = int(d["index"])
            if index in self.chunks:
                raise AssertionError(f"duplicate chunk {index} in attempt {self.attempt}")
            self.chunks[index] = d["text"]
            return str(d["text"])
        elif ev.event == "done":
            self.status = d.get("status")
            self.error = d.get("error")
        return None


class ThreadgateError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        raise ThreadgateError(resp.status_code, body)
    return resp.json() if resp.content else None


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    event, eid = "message", None
    data: list[str] = []
    async for line in lines:
        if line == "":
            if data:
                yield SseEvent(event, json.loads("\n".join(data)), eid)
            event, data, eid = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                eid = value


class AsyncClient:
    """Talks to one or several pods; `urls` beyond the first are tried when one fails."""

    def __init__(
        self, urls: str | Sequence[str], *, token: str | None = None, timeout: float = 30.0
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    @property
    def url(self) -> str:
        return self.urls[0]

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request, tried on each pod in turn while a pod is unreachable or answers 503."""
        last: Exception | None = None
        for url in self.urls:
            try:
                resp = await self.http.request(method, f"{url}{path}", **kwargs)
            except httpx.TransportError as exc:
                last = exc
                continue
            if resp.status_code == 503 and url != self.urls[-1]:
                continue  # draining or not ready: the next pod can answer
            return _check(resp)
        raise ConnectionError(f"no pod answered {method} {path}: {last!r}")

    async def post(
        self,
        thread_id: str,
        text: str,
        *,
        strategy: str = "enqueue",
        model_options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Post a message. A key is made up when none is given, so that retrying the POST on
        another pod (after a lost answer) can never create a second run."""
        headers = {"Idempotency-Key": idempotency_key or f"client-{uuid.uuid4()}"}
        body = {"input": text, "multitask_strategy": strategy, "model_options": model_options or {}}
        result: dict[str, Any] = await self._call(
            "POST", f"/threads/{thread_id}/runs", json=body, headers=headers
        )
        return result

    async def run(self, thread_id: str, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/threads/{thread_id}/runs/{run_id}")
        return result

    async def runs(self, thread_id: str, limit: int = 50) -> list[dict[str, Any]]:
        body = await self._call("GET", f"/threads/{thread_id}/runs", params={"limit": limit})
        return list(body["runs"])

    async def messages(self, thread_id: str) -> list[dict[str, Any]]:
        return list((await self._call("GET", f"/threads/{thread_id}/messages"))["messages"])

    async def cancel(self, thread_id: str, run_id: str, *, wait: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", f"/threads/{thread_id}/runs/{run_id}/cancel", params={"wait": wait}
        )
        return result

    async def events(
        self, thread_id: str, *, reconnects: int = 30, reply: Reply | None = None
    ) -> AsyncIterator[SseEvent]:
        """The raw events of the latest run, resuming across disconnects and pods."""
        last_id: str | None = None
        failures = 0
        pod = 0
        while True:
            url = f"{self.urls[pod % len(self.urls)]}/threads/{thread_id}/attach"
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with self.http.stream(
                    "GET", url, headers=headers, timeout=httpx.Timeout(30.0, read=None)
                ) as resp:
                    if resp.status_code == 204:
                        return
                    if resp.status_code >= 400:
                        await resp.aread()
                        _check(resp)
                    async for ev in parse_sse(resp.aiter_lines()):
                        failures = 0
                        if ev.id:
                            last_id = ev.id
                        yield ev
                        if ev.event == "done":
                            return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                pass
            failures += 1
            if failures > reconnects:
                raise ConnectionError(f"attach to {thread_id} failed {failures} times")
            pod += 1
            await asyncio.sleep(min(0.1 * 2 ** min(failures, 5), 2.0))

    async def attach(self, thread_id: str, *, reconnects: int = 30) -> AsyncIterator[str]:
        """Yield the reply's text as it streams; a reset is applied by dropping nothing shown
        twice: text already yielded is never yielded again, even across attempts."""
        reply = Reply()
        shown = ""
        async for ev in self.events(thread_id, reconnects=reconnects):
            reply.apply(ev)
            text = reply.text
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown) :]
                shown = text

    async def reply(self, thread_id: str, *, reconnects: int = 30) -> Reply:
        """Follow the latest run to its `done`; the reconstructed reply."""
        reply = Reply()
        async for ev in self.events(thread_id, reconnects=reconnects):
            reply.apply(ev)
        return reply


class Client:
    """The synchronous face of AsyncClient, for scripts and the CLI."""

    def __init__(self, urls: str | Sequence[str], *, token: str | None = None) -> None:
        self._urls = urls
        self._token = token

    def _run(self, coro_fn: Any) -> Any:
        async def main() -> Any:
            async with AsyncClient(self._urls, token=self._token) as c:
                return await coro_fn(c)

        return asyncio.run(main())

    def post(self, thread_id: str, text: str, **kw: Any) -> dict[str, Any]:
        return dict(self._run(lambda c: c.post(thread_id, text, **kw)))

    def run(self, thread_id: str, run_id: str) -> dict[str, Any]:
        return dict(self._run(lambda c: c.run(thread_id, run_id)))

    def runs(self, thread_id: str) -> list[dict[str, Any]]:
        return list(self._run(lambda c: c.runs(thread_id)))

    def messages(self, thread_id: str) -> list[dict[str, Any]]:
        return list(self._run(lambda c: c.messages(thread_id)))

    def cancel(self, thread_id: str, run_id: str, wait: bool = False) -> dict[str, Any]:
        return dict(self._run(lambda c: c.cancel(thread_id, run_id, wait=wait)))

    def reply(self, thread_id: str) -> Reply:
        result: Reply = self._run(lambda c: c.reply(thread_id))
        return result

    def attach(self, thread_id: str) -> Iterator[str]:
        """Streams text to the caller as it arrives (runs the loop in a helper thread)."""
        import queue
        import threading

        q: queue.Queue[tuple[str, Any]] = queue.Queue()

        async def pump() -> None:
            async with AsyncClient(self._urls, token=self._token) as c:
                async for text in c.attach(thread_id):
                    q.put(("text", text))

        def worker() -> None:
            try:
                asyncio.run(pump())
                q.put(("end", None))
            except BaseException as exc:  # handed to the caller's thread
                q.put(("error", exc))

        threading.Thread(target=worker, daemon=True).start()
        while True:
            kind, value = q.get()
            if kind == "text":
                yield value
            elif kind == "error":
                raise value
            else:
                return
