"""Reply sources: what a run streams its reply from. The public API for plug-in authors.

A source is any object with a `stream(prompt)` method, an async generator yielding text deltas
(`str`) and named data events (`Data`). `THREADGATE_MODEL` picks one: `mock`, `openai`, or an
import path `package.module:factory` (the uvicorn convention), where `factory(settings)` gets
the pod's `Settings` and returns the source. The module is imported from `PYTHONPATH`, the
installed packages, or the current directory. A path that cannot be loaded (no such module, no
such attribute, a factory that raises or returns something without `stream`) fails the pod's
start with one line naming it. Optional attributes, read with these defaults when a source
lacks them:

- `reads_history = True`: the prompt carries the thread's earlier turns (a query per run).
- `continues = False`: after a crash or a transient error, the source can continue a reply
  from the parts already streamed (`prompt.prefix_parts`); otherwise the reply is regenerated
  and clients get a `reset`. A source that finds it cannot continue this time raises
  `ContinuationRefused`: the run falls back to regenerating.
- `check_options(options)`: validate a run's `model_options` at POST time; raise `ValueError`
  (or `TypeError`, `InvalidRequest`) with a message for the client (HTTP 400). Without it,
  any options are accepted and passed on in `prompt.options`.

Data events are part of the reply: each shares the index sequence of the text chunks, streams
to clients as an SSE `data` event, is replayed to late attachers and is stored, in order, in
the assistant message's `parts`. A name matches `^[A-Za-z0-9_.:-]{1,64}$`; a payload is any
JSON value up to THREADGATE_MAX_DATA_BYTES once encoded. A data event that breaks these rules
ends the run `error`.

Errors: raise `TransientSourceError` (retried with backoff) or `PermanentSourceError` (the run
ends `error`; its message reaches clients). Anything else is permanent too, and only its class
name reaches clients: an exception's message may hold secrets.

    from threadgate.sources import Data, Prompt

    class Echo:
        reads_history = False
        continues = True

        async def stream(self, prompt: Prompt):
            if not prompt.prefix_parts:
                yield Data("tool_call", {"name": "echo"})
            said = len(prompt.prefix.split())  # parts may hold several words
            for word in prompt.messages[-1]["content"].split()[said:]:
                yield word + " "

    def make(settings):
        return Echo()

`examples/` holds two complete plug-ins: a tool-calling agent over an OpenAI-compatible API and
a plain-Python agent with data events and continuation.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
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

    `messages`: `{"role": "user" | "assistant", "content": ...}` dicts, this run's input last.
    `prefix_parts`: the reply's parts already streamed, when this attempt continues a reply
    (empty otherwise); `prefix` is their text. Continue right after them. Under load a pod
    merges adjacent text deltas into one part (coalescing): count what was said in the text,
    not in the number of parts.
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
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"model_options: {exc}") from None


def load_source(settings: Settings) -> ReplySource:
    """The source THREADGATE_MODEL names. One that cannot be loaded fails the pod's start."""
    if settings.model == "mock":
        from .models.mock import MockSource

        return MockSource(settings)
    if settings.model == "openai":
        from .models.openai import OpenAISource

        return OpenAISource(settings)
    return _plugin(settings)


def _plugin(settings: Settings) -> ReplySource:
    path = settings.model
    module_name, sep, attr = path.partition(":")
    where = f"THREADGATE_MODEL={path}"
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: use mock, openai or package.module:factory")
    _current_directory_importable()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, SyntaxError, whatever the module's own code raised
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name and module_name.startswith(exc.name):
            hint = " (is it on PYTHONPATH, installed, or in the current directory?)"
        raise ConfigError(f"{where}: cannot import {module_name}: {_said(exc)}{hint}") from exc
    factory: Any = module
    for name in attr.split("."):
        if not hasattr(factory, name):
            raise ConfigError(f"{where}: {module_name} has no attribute {attr}")
        factory = getattr(factory, name)
    if not callable(factory):
        raise ConfigError(
            f"{where}: {attr} is not callable ({type(factory).__name__}); name a factory that"
            " takes the settings and returns the source"
        )
    try:
        source: ReplySource = factory(settings)
    except Exception as exc:
        raise ConfigError(f"{where}: the factory raised {_said(exc)}") from exc
    _check_shape(where, source)
    return source


def _check_shape(where: str, source: Any) -> None:
    """Mistakes that would otherwise fail every run: caught at start instead."""
    kind = type(source).__name__
    stream = getattr(source, "stream", None)
    if not callable(stream):
        raise ConfigError(
            f"{where}: the factory returned {kind}, which has no stream(prompt) method"
        )
    if inspect.isgeneratorfunction(stream):
        raise ConfigError(
            f"{where}: {kind}.stream is a plain generator; make it `async def stream(self,"
            " prompt)` yielding str and Data"
        )
    if inspect.iscoroutinefunction(stream):
        raise ConfigError(
            f"{where}: {kind}.stream is a coroutine function without `yield`; it must be an"
            " async generator (yielding str and Data)"
        )
    check = getattr(source, "check_options", None)
    if check is not None and (not callable(check) or inspect.iscoroutinefunction(check)):
        raise ConfigError(f"{where}: {kind}.check_options must be a plain method")


def _current_directory_importable() -> None:
    """As uvicorn does for its app: a plug-in module in the current directory loads whether
    the pod runs as `python -m threadgate.cli` (which puts the directory first on sys.path)
    or as the `threadgate` console script (which does not). Appended: it never shadows an
    installed package."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def _said(exc: BaseException) -> str:
    """An exception in one line: its class, its message's first line, where it was raised."""
    said = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    message = said.strip().splitlines()[0][:300] if said and said.strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{text} ({exc.filename}:{exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename and f.filename != __file__]
    if own:
        return f"{text} ({own[-1].filename}:{own[-1].lineno})"
    return text


__all__ = [
    "ContinuationRefused",
    "Data",
    "InvalidRequest",
    "ModelError",
    "Part",
    "PermanentSourceError",
    "Prompt",
    "ReplySource",
    "Settings",
    "TransientSourceError",
    "check_options",
    "continues",
    "load_source",
    "reads_history",
]
