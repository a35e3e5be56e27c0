"""A local OpenAI-compatible chat-completions server for tests: streams, stalls, drops, fails.

Behaviour is chosen per request by the last user message: `stream` (default) streams
`word-i ` deltas; `stall` stops sending mid-stream; `drop` closes the connection mid-stream;
`429`, `500`, `400` answer that status; `flaky:N` fails with 500 on the first N requests
carrying that text, then streams. Every request body is recorded in `requests`.

A provider (or a gateway before it) that echoes the request's headers, credentials included:
`echo:STATUS` answers STATUS with the headers in its error body; `echo-event` streams a delta,
then an error event holding them (as `{"error": {...}}`); `echo-malformed` a delta, then an
event that is not JSON and holds them; `echo-header` streams a reply whose answer headers echo
the request's `authorization` (`x-echo-authorization`). `ECHO_MODES` lists them.

Long replies that continue: a last user message `long:N:DELAY_MS[:refuse]` streams N words
`w{i}.{r} ` (r: the how-manieth stream of that message, as a real model differs between two
tries), one every DELAY_MS. A request that ends with an assistant message (the reply's prefix:
vLLM's `continue_final_message`, DeepSeek's `prefix`, llama.cpp's prefill) continues after the
prefix's words; with `refuse` it answers 400 instead, as a server without continuation would.
`generated[message]` counts the words streamed across requests; `continuations` records the
form of each continuation request.

Tool calls: a request that offers `tools` and whose last message is the user's asking for one
(`weather in Paris` → get_weather {"city": "Paris"}, `calc: 2+3` → calculate {"expression":
"2+3"}, both in one message → two calls) streams the calls as OpenAI does (`delta.tool_calls`
with index, id, function name, then the arguments in fragments; finish_reason "tool_calls").
A request whose last message is a `tool` result streams `tool_answer(results)`: the tool
messages after the last assistant message, in order. As OpenAI, it refuses (400) tool
messages that do not answer each tool call of the assistant message before them exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from threadgate.devstack import free_port, release_port

WORDS = 5
ECHO_MODES = (
    "echo:400",
    "echo:401",
    "echo:429",
    "echo:500",
    "echo-event",
    "echo-malformed",
    "echo-header",
)


def reply_text(words: int = WORDS) -> str:
    return "".join(f"word-{i} " for i in range(words))


# What a user message asks of the tools a request offers: (pattern, tool, its arguments).
TOOL_ASKS = [
    (re.compile(r"weather in ([A-Z][a-z]+)"), "get_weather", lambda m: {"city": m[1]}),
    (re.compile(r"calc: ([0-9+\-*/(). ]+)"), "calculate", lambda m: {"expression": m[1].strip()}),
]


def tool_calls_for(text: str, offered: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The tool calls the fake makes for a user message, given the tools' names offered."""
    calls = []
    for pattern, name, arguments in TOOL_ASKS:
        match = pattern.search(text)
        if match and name in offered:
            calls.append((name, arguments(match)))
    return calls


def tool_answer(results: list[str]) -> str:
    """The final text the fake streams once it has the tools' results (their contents)."""
    return f"The tools said: {'; '.join(results)}."


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.seen: Counter[str] = Counter()
        self.generated: Counter[str] = Counter()  # long replies: words streamed, all requests
        self.streams: Counter[str] = Counter()  # long replies: streams begun
        self.continuations: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"body": body, "auth": request.headers.get("authorization")})
        if body.get("tools"):
            answer = self._tools(body)
            if answer is not None:
                return answer
        user = next(
            (m["content"] for m in reversed(body["messages"]) if m.get("role") == "user"), ""
        )
        if isinstance(user, str) and user.startswith("long:"):
            return self._long(body, user)
        mode = body["messages"][-1]["content"]
        self.seen[mode] += 1
        if isinstance(mode, str) and mode.startswith("echo"):
            return self._echo(mode, dict(request.headers))
        if mode in ("429", "500", "400"):
            return JSONResponse({"error": {"message": f"fake {mode}"}}, status_code=int(mode))
        if mode.startswith("flaky:") and self.seen[mode] <= int(mode.split(":")[1]):
            return JSONResponse({"error": {"message": "fake flake"}}, status_code=500)
        return StreamingResponse(self._events(mode), media_type="text/event-stream")

    async def _events(self, mode: str) -> AsyncIterator[bytes]:
        for i in range(WORDS):
            if i == 2 and mode == "stall":
                await asyncio.sleep(3600)  # a provider that hangs mid-reply
            if i == 2 and mode == "drop":
                raise ConnectionResetError("fake drop")  # the connection ends mid-stream
            chunk = {"choices": [{"index": 0, "delta": {"content": f"word-{i} "}}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        yield b"data: [DONE]\n\n"

    def _echo(self, mode: str, headers: dict[str, str]) -> Response:
        said = {"message": "fake echo", "request_headers": headers}
        if mode.startswith("echo:"):
            return JSONResponse({"error": said}, status_code=int(mode.split(":")[1]))
        if mode == "echo-header":
            echoed = {"x-echo-authorization": headers.get("authorization", "")}
            return StreamingResponse(
                _text_events("echoed "), media_type="text/event-stream", headers=echoed
            )

        async def events() -> AsyncIterator[bytes]:
            yield _event({"content": "word-0 "})
            if mode == "echo-event":
                yield f"data: {json.dumps({'error': said})}\n\n".encode()
            else:
                yield f"data: not json {headers}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    def _long(self, body: dict[str, Any], user: str) -> Response:
        _, words, delay_ms, *flags = user.split(":")
        last = body["messages"][-1]
        start = 0
        if last.get("role") == "assistant":
            self.continuations.append(
                {
                    "prefix_flag": last.get("prefix") is True,
                    "continue_final_message": body.get("continue_final_message") is True,
                    "add_generation_prompt": body.get("add_generation_prompt"),
                }
            )
            if "refuse" in flags:
                error = {"message": "this server cannot continue a message"}
                return JSONResponse({"error": error}, status_code=400)
            start = len(re.findall(r"\S+\s*", str(last["content"])))
        self.streams[user] += 1
        return StreamingResponse(
            self._long_events(user, start, int(words), float(delay_ms) / 1000),
            media_type="text/event-stream",
        )

    async def _long_events(
        self, user: str, start: int, words: int, delay: float
    ) -> AsyncIterator[bytes]:
        tag = self.streams[user]
        yield _event({"role": "assistant", "content": ""})
        for i in range(start, words):
            await asyncio.sleep(delay)  # a model's pace
            self.generated[user] += 1
            yield _event({"content": f"w{i}.{tag} "})
        yield _event({}, "stop")
        yield b"data: [DONE]\n\n"

    def _tools(self, body: dict[str, Any]) -> Response | None:
        """A tool round (see the module docstring), or None: the request streams as usual."""
        messages = body["messages"]
        last = messages[-1]
        if last.get("role") == "tool":
            turn = max(
                (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=0
            )
            called = {c["id"] for c in messages[turn].get("tool_calls") or []}
            results = messages[turn + 1 :]
            answered = [m.get("tool_call_id") for m in results if m.get("role") == "tool"]
            if not called or len(answered) != len(results) or sorted(answered) != sorted(called):
                error = {"message": "each tool call needs one tool message, and nothing else"}
                return JSONResponse({"error": error}, status_code=400)
            return StreamingResponse(
                _text_events(tool_answer([m["content"] for m in results])),
                media_type="text/event-stream",
            )
        if last.get("role") != "user":
            return None
        offered = {t["function"]["name"] for t in body["tools"]}
        calls = tool_calls_for(last["content"], offered)
        if not calls:
            return None
        ids = [f"call_{len(self.requests)}_{i}" for i in range(len(calls))]
        return StreamingResponse(
            _tool_call_events(list(zip(ids, calls, strict=True))), media_type="text/event-stream"
        )


def _event(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


async def _text_events(text: str) -> AsyncIterator[bytes]:
    yield _event({"role": "assistant", "content": ""})
    for word in re.findall(r"\S+\s*", text):
        yield _event({"content": word})
    yield _event({}, "stop")
    yield b"data: [DONE]\n\n"


async def _tool_call_events(
    calls: list[tuple[str, tuple[str, dict[str, Any]]]],
) -> AsyncIterator[bytes]:
    """As OpenAI streams tool calls: per call its id and name first, then its arguments (a
    JSON string) in fragments, all keyed by the call's index."""
    yield _event({"role": "assistant", "content": None})
    for index, (call_id, (name, arguments)) in enumerate(calls):
        head = {"index": index, "id": call_id, "type": "function"}
        yield _event({"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]})
        text = json.dumps(arguments)
        for at in range(0, len(text), 7):
            fragment = {"index": index, "function": {"arguments": text[at : at + 7]}}
            yield _event({"tool_calls": [fragment]})
    yield _event({}, "tool_calls")
    yield b"data: [DONE]\n\n"


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """An ASGI app (a fake server) on a free port of this event loop; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)  # uvicorn sets `started` once it listens
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        release_port(port)


@contextlib.asynccontextmanager
async def serve_fake(fake: FakeOpenAI | None = None) -> AsyncIterator[tuple[FakeOpenAI, str]]:
    """The fake (a FakeOpenAI, or the subclass given) on a free port of this event loop; yields
    it and its base URL."""
    fake = fake if fake is not None else FakeOpenAI()
    async with serve_app(fake.app) as url:
        yield fake, f"{url}/v1"
