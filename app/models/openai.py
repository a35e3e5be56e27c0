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
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ..errors import ModelError, PermanentModelError, TransientModelError
from ..logs import masked_headers, redact
from ..settings import Settings
from ..sources import ContinuationRefused, Part, Prompt, number_option

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = {408, 409, 425, 429}
LOGGED_CHARS = 300  # of a provider's error body
# Options a client may set when the operator allows them (THREADGATE_OPENAI_CLIENT_OPTIONS),
# each with its check; the model, the key and the bounds are the operator's.
KNOWN_OPTIONS = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


def classify_status(status: int, body: str, secret: str = "") -> ModelError:
    """A provider error: the body goes to the log only, credentials masked (a provider may
    echo our headers); clients get the status and a code."""
    logger.warning("model provider answered %d: %s", status, _loggable(body, secret))
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
        number_option(options, "max_tokens", low=1, high=self.max_tokens, integer=True)
        for key, (low, high) in KNOWN_OPTIONS.items():
            number_option(options, key, low=low, high=high)

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
        key = self.api_key.get_secret_value()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}/chat/completions"
        logger.debug("model provider request: POST %s %s", url, masked_headers(headers.items()))
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout) as client,
                client.stream("POST", url, json=body, headers=headers) as resp,
            ):
                logger.debug(
                    "model provider answer: %d %s",
                    resp.status_code,
                    {k: redact(v, [key]) for k, v in masked_headers(resp.headers.items()).items()},
                )
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    error = classify_status(resp.status_code, text, key)
                    if continuing and not error.transient:
                        raise ContinuationRefused(
                            f"model provider refused to continue ({resp.status_code})"
                        )
                    raise error
                async for text in _deltas(resp, key):
                    yield text
        except ModelError:
            raise
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise TransientModelError(f"model provider unreachable: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise TransientModelError(f"model provider error: {type(exc).__name__}") from exc


def _loggable(text: str, secret: str) -> str:
    # Masked before it is cut: a cut first could leave the key's first characters.
    return redact(text, [secret])[:LOGGED_CHARS]


async def _deltas(resp: httpx.Response, secret: str) -> AsyncIterator[str]:
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
        if isinstance(event, dict) and "error" in event:
            said = _loggable(str(event["error"]), secret)
            logger.warning("model provider error event: %s", said)
            raise PermanentModelError("model provider sent an error event")
        choices = event.get("choices") if isinstance(event, dict) else None
        if not isinstance(choices, list):
            continue
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                yield content
            if choice.get("finish_reason"):
                finished = True
    if not finished:
        # The connection closed before the reply did: worth another attempt.
        raise TransientModelError("model provider closed the stream early")
