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
- `check_options(options)` (or `validate_options`): validate a run's `model_options` at POST
  time. Raise `ValueError` (or `InvalidRequest`) with a message for the client: HTTP 400
  `invalid_request` with that message. Any other exception is a 400 too, naming only its class
  (its message may hold what a client should not read). Without it, any options are accepted
  and passed on in `prompt.options`. `number_option` checks a number against a range before
  use: huge integers (`1e400` is refused before it reaches you, but `10**400` is a valid
  JSON integer), floats where an integer is expected, NaN, booleans.

Data events are part of the reply: each shares the index sequence of the text chunks, streams
to clients as an SSE `data` event, is replayed to late attachers and is stored, in order, in
the assistant message's `parts`. A name matches `^[A-Za-z0-9_.:-]{1,64}$`; a payload is any
JSON value up to THREADGATE_MAX_DATA_BYTES once encoded. A data event that breaks these rules
ends the run `error`.

Errors: raise `TransientSourceError` (retried with backoff) or `PermanentSourceError` (the run
ends `error`; its message reaches clients). Anything else is permanent too, and only its class
name reaches clients: an exception's message may hold secrets.

    from threadgate.sources import Data, Prompt, number_option

    class Echo:
        reads_history = False
        continues = True

        def check_options(self, options):
            number_option(options, "pause_ms", low=0, high=1000)

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

import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import (
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


# The names a source's option check may have (the first one found is called).
OPTION_CHECKS = ("check_options", "validate_options")


def check_options(source: ReplySource, options: dict[str, Any]) -> None:
    """A run's model_options, checked by its source: InvalidRequest (400) if refused.

    Whatever the check raises is a 400, never a 500: a ValueError's (or InvalidRequest's)
    message is the client's to read; any other exception is named by its class only.
    """
    check = next((getattr(source, n) for n in OPTION_CHECKS if hasattr(source, n)), None)
    if check is None:
        return
    try:
        check(options)
    except InvalidRequest:
        raise
    except ValueError as exc:
        raise InvalidRequest(f"model_options: {_message(exc)}") from None
    except (Exception, SystemExit) as exc:  # a plug-in's sys.exit() must not end the pod
        raise InvalidRequest(f"model_options refused ({type(exc).__name__})") from None


def _message(exc: BaseException) -> str:
    try:
        return str(exc) or type(exc).__name__
    except Exception:  # a broken __str__
        return type(exc).__name__


Number = int | float


def number_option(
    options: Mapping[str, Any],
    name: str,
    *,
    low: Number,
    high: Number,
    integer: bool = False,
    default: Number | None = None,
) -> Number | None:
    """`options[name]` if it is a number from `low` to `high` (an integer when `integer`),
    else ValueError with a message for the client; `default` when the option is absent or null.

    Safe with any JSON number: integers of any size are compared exactly (no conversion to
    float, which overflows past 1e308), NaN and the infinities are refused, `true`/`false` are
    not numbers, and `2.0` is not an integer.
    """
    value = options.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not integer and isinstance(value, float):
        ok = math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ValueError(f"{name} must be {kind} from {low} to {high}")
    return value


__all__ = [
    "OPTION_CHECKS",
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
    "number_option",
    "reads_history",
]
