"""A local OpenAI-compatible chat-completions server for tests: streams, stalls, drops, fails.

Behaviour is chosen per request by the last user message: `stream` (default) streams
`word-i ` deltas; `stall` stops sending mid-stream; `drop` closes the connection mid-stream;
`429`, `500`, `400` answer that status; `flaky:N` fails with 500 on the first N requests
carrying that text, then streams. Every request body is recorded in `requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from threadgate.devstack import free_port

WORDS = 5


def reply_text(words: int = WORDS) -> str:
    return "".join(f"word-{i} " for i in range(words))


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.seen: Counter[str] = Counter()
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"body": body, "auth": request.headers.get("authorization")})
        mode = body["messages"][-1]["content"]
        self.seen[mode] += 1
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


@contextlib.asynccontextmanager
async def serve_fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    """The fake on a free port of this event loop; yields it and its base URL."""
    fake = FakeOpenAI()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)  # uvicorn sets `started` once it listens
    try:
        yield fake, f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        await task
