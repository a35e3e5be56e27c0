"""An OpenAI-compatible streaming chat-completions client with error classification."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from ..errors import ModelError, PermanentModelError, TransientModelError
from ..settings import Settings
from . import Prompt

TRANSIENT_STATUS = {408, 409, 425, 429}


def classify_status(status: int, body: str) -> ModelError:
    detail = body[:300]
    if status in TRANSIENT_STATUS or status >= 500:
        return TransientModelError(f"model provider answered {status}: {detail}")
    return PermanentModelError(f"model provider answered {status}: {detail}")


class OpenAIChunkSource:
    """POST {base_url}/chat/completions with stream=true; yields each delta's content."""

    reads_history = True

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.openai_base_url.rstrip("/")
        self.api_key = settings.openai_api_key
        self.model = settings.openai_model
        # connect/read timeouts bound a stalled provider; a stall mid-stream is a read timeout.
        self.timeout = httpx.Timeout(settings.openai_timeout_s, connect=10.0)

    async def stream(self, prompt: Prompt) -> AsyncIterator[str]:
        options = {k: v for k, v in prompt.options.items() if k in ("temperature", "max_tokens")}
        body = {
            "model": prompt.options.get("model", self.model),
            "messages": prompt.messages,
            "stream": True,
            **options,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout) as client,
                client.stream(
                    "POST", f"{self.base_url}/chat/completions", json=body, headers=headers
                ) as resp,
            ):
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    raise classify_status(resp.status_code, text)
                async for text in _deltas(resp):
                    yield text
        except ModelError:
            raise
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise TransientModelError(f"model provider unreachable: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise TransientModelError(f"model provider error: {type(exc).__name__}") from exc


async def _deltas(resp: httpx.Response) -> AsyncIterator[str]:
    finished = False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            finished = True
            break
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise TransientModelError("model provider sent a malformed event") from exc
        if "error" in event:
            raise PermanentModelError(f"model provider error: {str(event['error'])[:300]}")
        for choice in event.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content
            if choice.get("finish_reason"):
                finished = True
    if not finished:
        # The connection closed before the reply did: worth another attempt.
        raise TransientModelError("model provider closed the stream early")
