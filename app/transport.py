"""How a client reaches threadgate's pods: a request tried on each pod in turn, and a
thread's SSE events followed across disconnects and pods with `Last-Event-ID`.

`threadgate.client` builds on it (and re-exports its names): `AsyncClient` is a `Transport`
with the API's calls and the reply reducer on top.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(slots=True)
class SseEvent:
    event: str
    data: dict[str, Any]
    id: str | None = None


class ThreadgateError(Exception):
    """The server answered with an error (a 4xx or 5xx status and its JSON error body)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body

    @property
    def code(self) -> str:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return str(error.get("code", "")) if isinstance(error, dict) else ""

    @property
    def message(self) -> str:
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        return str(self.body)[:200] or f"HTTP {self.status}"


class Unreachable(ConnectionError):
    """No pod answered: refused, timed out, or every one of them unavailable (503)."""

    def __init__(self, urls: Sequence[str], reason: str) -> None:
        super().__init__(f"cannot reach {', '.join(urls)}: {reason}")
        self.urls = list(urls)
        self.reason = reason


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        raise ThreadgateError(resp.status_code, body)
    return resp.json() if resp.content else None


def _reason(exc: BaseException | None) -> str:
    """A transport failure in a few words ("connection refused", "timed out", ...)."""
    if exc is None:
        return "no answer"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused"
        return str(exc) or "cannot connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return str(exc) or type(exc).__name__


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


class Transport:
    """Talks to one or several pods; `urls` beyond the first are tried when one fails."""

    def __init__(
        self, urls: str | Sequence[str], *, token: str | None = None, timeout: float = 30.0
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def __aenter__(self) -> Transport:
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
        raise Unreachable(self.urls, _reason(last))

    async def events(
        self,
        thread_id: str,
        *,
        reconnects: int = 30,
        wait: bool = True,
        connect_retries: int | None = None,
    ) -> AsyncIterator[SseEvent]:
        """The raw events of the thread's latest run, resuming across disconnects and pods.

        `wait=False`: a thread with no run yet ends at once (the server answers 204) instead
        of waiting for its first run. `connect_retries`: failed attempts allowed before any
        pod has answered (default: as many as `reconnects`); past them, `Unreachable`.
        """
        last_id: str | None = None
        failures = 0
        answered = False
        pod = 0
        last_error: BaseException | None = None
        params = {} if wait else {"wait": "false"}
        while True:
            url = f"{self.urls[pod % len(self.urls)]}/threads/{thread_id}/attach"
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                async with self.http.stream(
                    "GET",
                    url,
                    headers=headers,
                    params=params,
                    timeout=httpx.Timeout(30.0, read=None),
                ) as resp:
                    if resp.status_code == 204:
                        return
                    if resp.status_code >= 400 and not (
                        resp.status_code == 503 and len(self.urls) > 1
                    ):
                        await resp.aread()
                        _check(resp)
                    if resp.status_code < 400:
                        answered = True
                        async for ev in parse_sse(resp.aiter_lines()):
                            failures = 0
                            if ev.id:
                                last_id = ev.id
                            yield ev
                            if ev.event == "done":
                                return
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                last_error = exc
            failures += 1
            limit = reconnects if answered or connect_retries is None else connect_retries
            if failures > limit:
                raise Unreachable(self.urls, _reason(last_error))
            pod += 1
            await asyncio.sleep(min(0.1 * 2 ** min(failures, 5), 2.0))  # reconnect backoff
