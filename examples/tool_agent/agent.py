"""A tool-calling agent over an OpenAI-compatible chat-completions API, as a threadgate plug-in.

Each round sends the conversation with the tools (tools.py); the model's text streams to the
client, and when it calls tools the agent emits a `tool_call` data event per call, runs them,
emits a `tool_result` per call, sends the results back as `tool` messages and asks again,
until the model answers without calling a tool.

Continuation: after a crash the next attempt rebuilds the conversation from the data events
already streamed (`prompt.prefix_parts`), so tools that ran are not run again, and a call
whose result never reached the stream is run now. The model's text cannot be continued
mid-sentence over this API, so when the dead attempt was streaming text the agent raises
`ContinuationRefused`: the run regenerates the reply (clients get a `reset`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from threadgate.settings import Settings
from threadgate.sources import (
    ContinuationRefused,
    Data,
    Part,
    PermanentSourceError,
    Prompt,
    TransientSourceError,
    number_option,
)

from .tools import TOOLS, run_tool

MAX_ROUNDS = 5  # model requests per reply: a model that keeps calling tools is stopped
TRANSIENT = {408, 409, 425, 429}  # and every 5xx


@dataclass
class Round:
    """One assistant turn: its text and its tool calls (each `{"id", "name", "arguments"}`)."""

    text: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)

    def messages(self) -> list[dict[str, Any]]:
        """The turn as the API wants it back: the assistant message, then one per result."""
        wire = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": _arguments_text(c["arguments"])},
            }
            for c in self.calls
        ]
        out: list[dict[str, Any]] = [
            {"role": "assistant", "content": self.text or None, "tool_calls": wire}
        ]
        for r in self.results:
            out.append(
                {"role": "tool", "tool_call_id": r["id"], "content": json.dumps(r["result"])}
            )
        return out


class ToolAgent:
    reads_history = True
    continues = True  # after tool calls and results; never mid-text (ContinuationRefused)

    def __init__(self, base_url: str, api_key: str, model: str, timeout_s: float) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)

    def check_options(self, options: dict[str, Any]) -> None:
        """At POST time: a 400 with this message instead of a run that fails."""
        if set(options) - {"temperature"}:
            raise ValueError("the tool agent takes one option: temperature")
        number_option(options, "temperature", low=0, high=2)

    async def stream(self, prompt: Prompt) -> AsyncIterator[Part]:
        messages: list[dict[str, Any]] = list(prompt.messages)
        rounds = resume(prompt.prefix_parts)  # empty unless this attempt continues a reply
        for turn in rounds:
            async for part in self._run_tools(turn):  # calls the dead attempt left unanswered
                yield part
            messages += turn.messages()
        for _ in range(MAX_ROUNDS - len(rounds)):
            turn = Round()
            async for text in self._complete(messages, prompt.options, turn):
                yield text
            if not turn.calls:
                return  # the final answer
            for call in turn.calls:
                yield Data("tool_call", call)
            async for part in self._run_tools(turn):
                yield part
            messages += turn.messages()
        raise PermanentSourceError(f"the model still called tools after {MAX_ROUNDS} rounds")

    async def _run_tools(self, turn: Round) -> AsyncIterator[Part]:
        for call in turn.calls[len(turn.results) :]:
            result = {"id": call["id"], "name": call["name"]}
            result["result"] = run_tool(call["name"], call["arguments"])
            turn.results.append(result)
            yield Data("tool_result", result)

    async def _complete(
        self, messages: list[dict[str, Any]], options: dict[str, Any], turn: Round
    ) -> AsyncIterator[str]:
        """One streamed request: yields the text deltas, puts the tool calls in `turn`."""
        body = {"model": self.model, "messages": messages, "tools": TOOLS, "stream": True}
        calls: dict[int, dict[str, Any]] = {}  # by index: OpenAI streams them in fragments
        finished = False
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout) as http,
                http.stream("POST", self.url, json={**body, **options}, headers=self.headers) as r,
            ):
                if r.status_code != 200:
                    await r.aread()  # not passed on: a provider may echo the request's secrets
                    if r.status_code in TRANSIENT or r.status_code >= 500:
                        raise TransientSourceError(f"the model API answered {r.status_code}")
                    raise PermanentSourceError(f"the model API answered {r.status_code}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    if line[5:].strip() == "[DONE]":
                        finished = True
                        break
                    for choice in json.loads(line[5:]).get("choices") or ():
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            turn.text += delta["content"]
                            yield delta["content"]
                        for piece in delta.get("tool_calls") or ():
                            call = calls.setdefault(piece["index"], {"arguments": ""})
                            function = piece.get("function") or {}
                            call["id"] = piece.get("id") or call.get("id", "")
                            call["name"] = function.get("name") or call.get("name", "")
                            call["arguments"] += function.get("arguments") or ""
                        finished = finished or bool(choice.get("finish_reason"))
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise TransientSourceError(
                f"the model API is unreachable: {type(exc).__name__}"
            ) from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TransientSourceError("the model API sent a malformed event") from exc
        if not finished:
            raise TransientSourceError("the model API closed the stream early")
        turn.calls = [
            {"id": c["id"], "name": c["name"], "arguments": _parsed(c["arguments"])}
            for _, c in sorted(calls.items())
        ]


def resume(parts: tuple[Part, ...]) -> list[Round]:
    """The rounds a dead attempt streamed, rebuilt from its parts. Each round is text, then
    `tool_call` events, then `tool_result` events: anything after a result opens the next.
    Parts that end in text refuse (ContinuationRefused): the model's text cannot be continued
    over this API, so the run regenerates the reply."""
    rounds: list[Round] = []
    for part in parts:
        result = isinstance(part, Data) and part.name == "tool_result"
        if not rounds or (rounds[-1].results and not result):
            rounds.append(Round())
        if isinstance(part, str):
            rounds[-1].text += part
        elif part.name == "tool_call":
            rounds[-1].calls.append(part.payload)
        elif result:
            rounds[-1].results.append(part.payload)
    if parts and isinstance(parts[-1], str):
        raise ContinuationRefused("the model's text cannot be continued: regenerating the reply")
    return rounds


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments  # shown as sent; the tool answers with an error


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def make(settings: Settings) -> ToolAgent:
    """THREADGATE_MODEL=examples.tool_agent:make; the API is THREADGATE_OPENAI_BASE_URL,
    THREADGATE_OPENAI_API_KEY, THREADGATE_OPENAI_MODEL, THREADGATE_OPENAI_TIMEOUT_S."""
    return ToolAgent(
        settings.openai_base_url,
        settings.openai_api_key.get_secret_value(),
        settings.openai_model,
        settings.openai_timeout_s,
    )
