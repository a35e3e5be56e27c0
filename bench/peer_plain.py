"""The no-durability floor: a plain FastAPI SSE endpoint streaming the same mock reply.

No database, no JetStream, no queue: the request itself runs the mock and writes its chunks, in
threadgate's SSE format. A run lives and dies with its connection and its process. Served by
uvicorn (uvloop, httptools) from bench/peers.py; not part of threadgate.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI(title="peer: plain SSE")


def frame(event: str, body: dict[str, object], seq: int) -> bytes:
    data = json.dumps(body, separators=(",", ":"))
    return f"id: {seq}\nevent: {event}\ndata: {data}\n\n".encode()


@app.get("/ok")
async def ok() -> dict[str, bool]:
    return {"ok": True}


@app.get("/stream")
async def stream(chunks: int = 20, delay_ms: float = 50) -> StreamingResponse:
    run_id = str(uuid.uuid4())

    async def events() -> AsyncIterator[bytes]:
        yield frame("run_started", {"run_id": run_id, "attempt": 1}, 1)
        for i in range(chunks):
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            body = {"run_id": run_id, "attempt": 1, "index": i, "text": f"chunk-{i} "}
            yield frame("chunk", body, i + 2)
        yield frame("done", {"run_id": run_id, "status": "success"}, chunks + 2)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
