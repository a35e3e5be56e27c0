"""A Python client of threadgate that never shows a duplicate.

`Reply.apply` folds a run's events into its reply (contract v2: `reset`, `resume_from`,
`data`, `stalled`). `AsyncClient` (its transport, with reconnects across pods, is
app/transport.py) calls the API, and `attach` turns the reply into text to print, saying so
when a regenerated attempt replaces what was printed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .transport import SseEvent, ThreadgateError, Transport, Unreachable, parse_sse

__all__ = [
    "RESTARTED",
    "AsyncClient",
    "Client",
    "DataPart",
    "Part",
    "Reply",
    "SseEvent",
    "TextPart",
    "ThreadgateError",
    "Unreachable",
    "parse_sse",
    "render",
    "to_print",
]


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True, slots=True)
class DataPart:
    """A `data` event of the reply source (a tool call, a citation, ...)."""

    name: str
    payload: Any
    type: Literal["data"] = "data"


Part = TextPart | DataPart


@dataclass(slots=True)
class Reply:
    """A run's reply as a client reconstructs it from its events (contract v2).

    `apply` is the one reducer of the protocol on the Python side: a new run starts over; a
    `reset`, or a new attempt without `resume_from`, drops the partial reply (a regenerated
    attempt follows); `run_started` with `resume_from: k` keeps the first k parts and
    continues; events of a superseded attempt and parts received twice are ignored.
    """

    run_id: str | None = None
    attempt: int = 0
    chunks: dict[int, str] = field(default_factory=dict)  # text chunks, by index
    data: dict[int, DataPart] = field(default_factory=dict)  # data events, by index
    resets: int = 0  # partial replies dropped (a reset, or a regenerating attempt)
    resumes: int = 0  # attempts that continued the reply (resume_from)
    duplicates: int = 0  # parts received again (after a reconnect without Last-Event-ID)
    stalled: str | None = None  # the executor a `stalled` event named, until the next attempt
    status: str | None = None
    error: dict[str, Any] | None = None
    events: list[SseEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.chunks[i] for i in sorted(self.chunks))

    @property
    def parts(self) -> list[Part]:
        """Text and data parts in index order; consecutive text chunks make one text part."""
        out: list[Part] = []
        for i in sorted(self.chunks.keys() | self.data.keys()):
            if i in self.data:
                out.append(self.data[i])
            elif out and isinstance(out[-1], TextPart):
                out[-1] = TextPart(out[-1].text + self.chunks[i])
            else:
                out.append(TextPart(self.chunks[i]))
        return out

    def _drop(self, start: int = 0) -> bool:
        """Forget the parts from index `start` on; whether there were any."""
        gone = [i for i in self.chunks.keys() | self.data.keys() if i >= start]
        for i in gone:
            self.chunks.pop(i, None)
            self.data.pop(i, None)
        return bool(gone)

    def apply(self, ev: SseEvent) -> str | None:
        """Fold one event in; returns the text it added to the reply, if any."""
        self.events.append(ev)
        d = ev.data
        run_id = d.get("run_id")
        if ev.event == "run_started":
            attempt = int(d["attempt"])
            if run_id != self.run_id:  # the thread's next run: start over
                self._drop()
                self.run_id, self.attempt = run_id, attempt
                self.status = self.error = self.stalled = None
                return None
            if attempt <= self.attempt:
                return None  # this attempt's start seen again, or a superseded one's
            self.attempt, self.stalled = attempt, None
            resume_from = d.get("resume_from")
            if resume_from is not None:
                self._drop(int(resume_from))  # what this attempt continues after stays
                self.resumes += 1
            elif self._drop():
                self.resets += 1  # a regenerating attempt whose reset this client missed
            return None
        if run_id != self.run_id and self.run_id is not None:
            return None  # another run's straggler
        self.run_id = run_id
        attempt = int(d.get("attempt", self.attempt))
        if ev.event == "reset":
            if attempt < self.attempt:
                return None  # a superseded attempt's
            # The same reset again (a reconnect that replays it) drops nothing new.
            if self._drop() or attempt > self.attempt:
                self.resets += 1
            self.attempt = attempt
        elif ev.event in ("chunk", "data"):
            if attempt < self.attempt:
                return None  # a straggler of a superseded attempt
            self.attempt = attempt
            index = int(d["index"])
            if index in self.chunks or index in self.data:
                self.duplicates += 1
                return None
            if ev.event == "data":
                self.data[index] = DataPart(str(d["name"]), d.get("payload"))
                return None
            self.chunks[index] = str(d["text"])
            return self.chunks[index]
        elif ev.event == "stalled":
            self.stalled = d.get("executor")
        elif ev.event == "done":
            self.status = d.get("status")
            self.error = d.get("error")
        return None


# Printed by `attach` when the reply shown so far is dropped (a regenerated attempt follows).
RESTARTED = "\n[reply restarted: its attempt was cut short; the text above is discarded]\n"


def to_print(shown: str, now: str) -> list[str]:
    """What to print to go from `shown` to `now`: what it adds, or, when `now` no longer
    extends what was printed, `RESTARTED` and the reply from its start."""
    if now.startswith(shown):
        return [now[len(shown) :]] if len(now) > len(shown) else []
    return [RESTARTED, now] if now else [RESTARTED]


def render(reply: Reply) -> str:
    """The reply as a person reads it: its text, with each data part on a line of its own
    (a line break before it only when the text before it has not ended its line)."""
    out = ""
    for part in reply.parts:
        if isinstance(part, TextPart):
            out += part.text
        else:
            payload = json.dumps(part.payload, ensure_ascii=False, default=str)
            lead = "\n" if out and not out.endswith("\n") else ""
            out += f"{lead}[{part.name}] {payload}\n"
    return out


# Pages smaller than the server's default page size are asked for by size; larger wants are
# read a default-sized page at a time (THREADGATE_PAGE_LIMIT_DEFAULT, 50 unless changed).
PAGE = 50


class AsyncClient(Transport):
    """Talks to one or several pods; `urls` beyond the first are tried when one fails."""

    async def __aenter__(self) -> AsyncClient:
        return self

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

    async def runs_page(
        self, thread_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the thread's runs, newest first: `{"runs", "next_cursor"}` (the
        server's default size when `limit` is None; `cursor`: a page's `next_cursor`)."""
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
        page: dict[str, Any] = await self._call("GET", f"/threads/{thread_id}/runs", params=params)
        return page

    async def runs(self, thread_id: str, limit: int | None = 50) -> list[dict[str, Any]]:
        """The thread's runs, newest first: the `limit` newest, or all (None: page through)."""
        runs: list[dict[str, Any]] = []
        async for page in self._pages(self.runs_page, thread_id, limit):
            runs += page["runs"]
        return runs[:limit] if limit is not None else runs

    async def messages_page(
        self, thread_id: str, *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of the conversation, newest message first: `{"thread_id", "messages",
        "next_cursor"}` (a chat shows its latest turns, then pages back)."""
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
        page: dict[str, Any] = await self._call(
            "GET", f"/threads/{thread_id}/messages", params=params
        )
        return page

    async def messages(self, thread_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The conversation in order, oldest first: its `limit` latest messages, or all of
        it (None: every page)."""
        newest_first: list[dict[str, Any]] = []
        async for page in self._pages(self.messages_page, thread_id, limit):
            newest_first += page["messages"]
        return list(reversed(newest_first[:limit] if limit is not None else newest_first))

    async def _pages(
        self, read: Any, thread_id: str, limit: int | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Pages from the newest until `limit` items (None: all), each of the server's
        default size, or smaller when fewer are wanted."""
        cursor: str | None = None
        got = 0
        while True:
            want = limit - got if limit is not None and limit - got < PAGE else None
            page: dict[str, Any] = await read(thread_id, limit=want, cursor=cursor)
            yield page
            got += len(page.get("runs", page.get("messages", [])))
            cursor = page["next_cursor"]
            if cursor is None or (limit is not None and got >= limit):
                return

    async def cancel(self, thread_id: str, run_id: str, *, wait: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", f"/threads/{thread_id}/runs/{run_id}/cancel", params={"wait": wait}
        )
        return result

    async def attach(
        self,
        thread_id: str,
        *,
        reconnects: int = 30,
        wait: bool = True,
        connect_retries: int | None = None,
        reply: Reply | None = None,
    ) -> AsyncIterator[str]:
        """Yield the latest run's reply as text to print, as it streams.

        Each piece extends what was yielded before, except when the reply is replaced (a
        `reset`: the attempt that was streaming died and a new one regenerates the reply):
        then `RESTARTED` is yielded, followed by the new reply from its start. A continued
        attempt (`resume_from`) prints on seamlessly. Pass `reply` to read the outcome
        (status, error, parts) once the iteration ends.
        """
        reply = reply if reply is not None else Reply()
        shown = ""
        async for ev in self.events(
            thread_id, reconnects=reconnects, wait=wait, connect_retries=connect_retries
        ):
            reply.apply(ev)
            text = render(reply)
            for piece in to_print(shown, text):
                yield piece
            shown = text

    async def reply(self, thread_id: str, *, reconnects: int = 30, wait: bool = True) -> Reply:
        """Follow the latest run to its `done`; the reconstructed reply."""
        reply = Reply()
        async for ev in self.events(thread_id, reconnects=reconnects, wait=wait):
            reply.apply(ev)
        return reply


class Client:
    """The synchronous face of AsyncClient, for scripts."""

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

    def runs(self, thread_id: str, limit: int | None = 50) -> list[dict[str, Any]]:
        return list(self._run(lambda c: c.runs(thread_id, limit)))

    def messages(self, thread_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        return list(self._run(lambda c: c.messages(thread_id, limit)))

    def runs_page(self, thread_id: str, **kw: Any) -> dict[str, Any]:
        return dict(self._run(lambda c: c.runs_page(thread_id, **kw)))

    def messages_page(self, thread_id: str, **kw: Any) -> dict[str, Any]:
        return dict(self._run(lambda c: c.messages_page(thread_id, **kw)))

    def cancel(self, thread_id: str, run_id: str, wait: bool = False) -> dict[str, Any]:
        return dict(self._run(lambda c: c.cancel(thread_id, run_id, wait=wait)))

    def reply(self, thread_id: str, *, wait: bool = True) -> Reply:
        result: Reply = self._run(lambda c: c.reply(thread_id, wait=wait))
        return result

    def attach(
        self, thread_id: str, *, wait: bool = True, reply: Reply | None = None
    ) -> Iterator[str]:
        """`AsyncClient.attach`, streamed to the caller as it arrives (the loop runs in a
        helper thread)."""
        import queue
        import threading

        q: queue.Queue[tuple[str, Any]] = queue.Queue()

        async def pump() -> None:
            async with AsyncClient(self._urls, token=self._token) as c:
                async for text in c.attach(thread_id, wait=wait, reply=reply):
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
