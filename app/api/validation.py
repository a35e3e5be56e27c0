"""Pydantic's validation errors as threadgate's 400 body: each problem names its field and rule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidRequest

# Where a request's value came from, as a person reads it (FastAPI's first `loc` item).
_SOURCES = {"query": "query parameter", "header": "header", "path": "path", "cookie": "cookie"}
_SHOWN = 3  # problems named in the message; the rest are in details.problems
_CTX_TYPES = (str, int, float, bool)


def field_name(loc: Sequence[Any]) -> str:
    """`("body", "model_options", "chunks")` → `model_options.chunks`; a query parameter or a
    header says so: `limit (query parameter)`."""
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        return ".".join(parts[1:]) or "the body"
    if parts and parts[0] in _SOURCES:
        return f"{'.'.join(parts[1:]) or parts[0]} ({_SOURCES[parts[0]]})"
    return ".".join(parts) or "the request"


def rule_text(error: Mapping[str, Any]) -> str:
    """Pydantic's message for the rule, without its "Value error, " prefix."""
    msg = str(error.get("msg", ""))
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def problem(error: Mapping[str, Any], loc: Sequence[Any] | None = None) -> dict[str, Any]:
    """One problem of a 400 body: the field, the rule (pydantic's error type, stable for
    scripts, and its bounds), and the message. The offending value is not echoed back."""
    where = list(error.get("loc", ())) if loc is None else list(loc)
    msg = rule_text(error)
    if error.get("type") == "json_invalid" and len(where) == 2:
        # FastAPI's loc is ("body", <character position>): a place, not a field.
        msg = f"not valid JSON ({(error.get('ctx') or {}).get('error', msg)}, at character {where[1]})"
        where = where[:1]
    out: dict[str, Any] = {
        "loc": [str(p) for p in where],
        "field": field_name(where),
        "rule": str(error.get("type", "invalid")),
        "msg": msg,
    }
    ctx = {k: v for k, v in (error.get("ctx") or {}).items() if isinstance(v, _CTX_TYPES)}
    if ctx and error.get("type") != "value_error":
        out["limits"] = ctx
    return out


def invalid(errors: Sequence[Mapping[str, Any]], *, lead: str = "") -> InvalidRequest:
    """The 400 error for these validation errors: its message names each field and rule
    (`input: String should have at least 1 character`), details.problems lists them all."""
    problems = [problem(e) for e in errors]
    named = "; ".join(f"{p['field']}: {p['msg']}" for p in problems[:_SHOWN])
    if len(problems) > _SHOWN:
        named += f"; and {len(problems) - _SHOWN} more (details.problems)"
    message = f"{lead}: {named}" if lead and named else lead or named or "the request is invalid"
    return InvalidRequest(message, problems=problems) if problems else InvalidRequest(message)
