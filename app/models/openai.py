"""An OpenAI-compatible streaming chat-completions source, with continuation and error classes.

Continuing a reply after a prefix (THREADGATE_OPENAI_CONTINUE) depends on the server:
`continue_final_message` (vLLM, SGLang, TGI: a trailing assistant message with
`"continue_final_message": true, "add_generation_prompt": false`), `prefix` (DeepSeek beta,
Mistral: a trailing `{"role": "assistant", "content": prefix, "prefix": true}`), `prefill`
(llama.cpp server and others that continue a trailing assistant message), or `off`. A server
that refuses a continuation request (4xx) makes the run regenerate instead.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ..errors import ModelError, PermanentModelError, TransientModelError
from ..settings import Settings
from ..sources import ContinuationRefused, Part, Prompt

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = {408, 409, 425, 429}
# Options a client may set when the operator allows them (THREADGATE_OPENAI_CLIENT_OPTIONS),
# each with its check; the model, the key and the bounds are the operator's.
KNOWN_OPTIONS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


def classify_status(status: int, body: str, secret: str = "") -> ModelError:
    """A provider error: the body goes to the log only, the operator's key blanked out (a
    provider may echo headers); clients get the status and a code."""
    logged = body[:300].replace(secret, "***") if secret else body[:300]
    logger.warning("model provider answered %d: %s", status, logged)
    if status in TRANSIENT_STATUS or status >= 500:
        return TransientModelError(f"model provider answered {status}")
    return PermanentModelError(f"model provider answered {status}")


class OpenAISource:
    """POST {base_url}/chat/completions with stream=true; yields each delta's content."""

    reads_history = True

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.openai_base_url.rstrip("/")
        self.api_key = settings.openai_api_key
        self.model = settings.openai_model
        self.mode = settings.openai_continue
        self.continues = self.mode != "off"
        self.allowed = settings.openai_client_option_names
        self.max_tokens = settings.openai_max_tokens
        # connect/read timeouts bound a stalled provider; a stall mid-stream is a read timeout.
        self.timeout = httpx.Timeout(settings.openai_timeout_s, connect=10.0)

    def check_options(self, options: dict[str, Any]) -> None:
        refused = sorted(set(options) - self.allowed)
        if refused:
            allowed = ", ".join(sorted(self.allowed)) or "none"
            raise ValueError(f"not allowed: {', '.join(refused)} (allowed: {allowed})")
        for key, value in options.items():
            if key == "max_tokens":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError("max_tokens must be an integer")
                if not 1 <= value <= self.max_tokens:
                    raise ValueError(f"max_tokens must be from 1 to {self.max_tokens}")
            elif key in KNOWN_OPTIONS:
                low, high = KNOWN_OPTIONS[key]
                if (
                    not isinstance(value, int | float)
                    or isinstance(value, bool)
                    or not math.isfinite(value)
                    or not low <= value <= high
                ):
                    raise ValueError(f"{key} must be a number from {low} to {high}")

    def request(self, prompt: Prompt) -> dict[str, Any]:
        """The request body: the operator's model, the client's allowed options, and the
        reply's prefix when this attempt continues one."""
        messages: list[dict[str, Any]] = list(prompt.messages)
        extra: dict[str, Any] = {}
        if prompt.prefix_parts and self.continues:
            last: dict[str, Any] = {"role": "assistant", "content": prompt.prefix}
            if self.mode == "prefix":
                last["prefix"] = True
            elif self.mode == "continue_final_message":
                extra = {"continue_final_message": True, "add_generation_prompt": False}
            messages.append(last)
        if "max_tokens" not in prompt.options:
            extra["max_tokens"] = self.max_tokens
        options = {k: v for k, v in prompt.options.items() if k in self.allowed}
        return {"model": self.model, "messages": messages, "stream": True, **options, **extra}

    async def stream(self, prompt: Prompt) -> AsyncIterator[Part]:
        body = self.request(prompt)
        continuing = bool(prompt.prefix_parts and self.continues)
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
                    key = self.api_key.get_secret_value()
                    error = classify_status(resp.status_code, text, key)
                    if continuing and not error.transient:
                        raise ContinuationRefused(
                            f"model provider refused to continue ({resp.status_code})"
                        )
                    raise error
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
            logger.warning("model provider error event: %s", str(event["error"])[:300])
            raise PermanentModelError("model provider sent an error event")
        for choice in event.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content
            if choice.get("finish_reason"):
                finished = True
    if not finished:
        # The connection closed before the reply did: worth another attempt.
        raise TransientModelError("model provider closed the stream early")
