"""Reply sources: what a run streams its reply from. The public API for plug-in authors.

A source is any object with a `stream(prompt)` method yielding text deltas (`str`) and named
data events (`Data`). `THREADGATE_MODEL` picks one: `mock`, `openai`, or an import path
`package.module:factory`, where `factory(settings)` returns the source. Optional attributes,
read with these defaults when a source lacks them:

- `reads_history = True`: the prompt carries the thread's earlier turns (a query per run).
- `continues = False`: after a crash or a transient error, the source can continue a reply
  from the parts already streamed (`prompt.prefix`); otherwise the reply is regenerated and
  clients get a `reset`. A source that finds it cannot continue this time raises
  `ContinuationRefused`: the run falls back to regenerating.
- `check_options(options)`: validate a run's `model_options` at POST time; raise `ValueError`
  (or `InvalidRequest`) with a message for the client (HTTP 400).

Errors: raise `TransientSourceError` (retried with backoff) or `PermanentSourceError` (the run
ends `error`). Anything else is permanent too, and only its class name reaches clients: an
exception's message may hold secrets.

    from threadgate.sources import Data, Prompt

    class Echo:
        reads_history = False
        continues = True

        async def stream(self, prompt: Prompt):
            if not prompt.prefix_parts:
                yield Data("tool_call", {"name": "echo"})
            said = sum(isinstance(p, str) for p in prompt.prefix_parts)
            for word in prompt.messages[-1]["content"].split()[said:]:
                yield word + " "

    def make(settings):
        return Echo()
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import (
    ConfigError,
    InvalidRequest,
    ModelError,
    PermanentModelError,
    TransientModelError,
)
from .settings import Settings

TransientSourceError = TransientModelError
PermanentSourceError = PermanentModelError


class ContinuationRefused(PermanentModelError):
    """The provider refused to continue the reply after its prefix: regenerate it instead."""

    code = "continuation_refused"


@dataclass(frozen=True, slots=True)
class Data:
    """A named data event of the reply: a tool call, a tool result, a citation, ... `payload`
    is any JSON value. Streamed to clients as an SSE `data` event and stored with the reply."""

    name: str
    payload: Any = None


Part = str | Data


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a source is asked: the thread's earlier turns, then this run's input.

    `prefix_parts`: the reply's parts already streamed, when this attempt continues a reply
    (empty otherwise); `prefix` is their text. Continue right after them.
    """

    messages: list[dict[str, str]]
    options: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1
    prefix_parts: tuple[Part, ...] = ()

    @property
    def prefix(self) -> str:
        return "".join(p for p in self.prefix_parts if isinstance(p, str))


@runtime_checkable
class ReplySource(Protocol):
    """Streams a reply as text deltas and data events (see the module docstring)."""

    def stream(self, prompt: Prompt) -> AsyncIterator[Part]: ...


def reads_history(source: ReplySource) -> bool:
    return bool(getattr(source, "reads_history", True))


def continues(source: ReplySource) -> bool:
    return bool(getattr(source, "continues", False))


def check_options(source: ReplySource, options: dict[str, Any]) -> None:
    """A run's model_options, checked by its source: InvalidRequest (400) if refused."""
    check = getattr(source, "check_options", None)
    if check is None:
        return
    try:
        check(options)
    except InvalidRequest:
        raise
    except ValueError as exc:
        raise InvalidRequest(f"model_options: {exc}") from None


def load_source(settings: Settings) -> ReplySource:
    """The source THREADGATE_MODEL names. A bad import path fails the pod's start."""
    if settings.model == "mock":
        from .models.mock import MockSource

        return MockSource(settings)
    if settings.model == "openai":
        from .models.openai import OpenAISource

        return OpenAISource(settings)
    module_name, sep, attr = settings.model.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"THREADGATE_MODEL={settings.model!r}: use mock, openai or package.module:factory"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"THREADGATE_MODEL={settings.model!r} cannot be loaded: {exc!r}") from exc
    source = factory(settings)
    if not isinstance(source, ReplySource):
        raise ConfigError(
            f"THREADGATE_MODEL={settings.model!r}: the factory returned {type(source).__name__},"
            " which has no stream(prompt) method"
        )
    return source


__all__ = [
    "ContinuationRefused",
    "Data",
    "ModelError",
    "Part",
    "PermanentSourceError",
    "Prompt",
    "ReplySource",
    "Settings",
    "TransientSourceError",
    "load_source",
]
