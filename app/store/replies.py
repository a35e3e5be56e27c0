"""How a reply is stored: its text, and a layout that gives back its parts by index exactly.

A stored reply is read back part by part (a client resuming at part n of an ended run gets
parts n.. from here, streams/relay.py), so the text alone is not enough: `layout` lists the
parts in order, a text part as its length in code points (its text is the next slice of the
content), a data part as `[name, payload]`. Layout is ASCII JSON in a text column: it holds any
payload, NUL included, which PostgreSQL's jsonb refuses.

Text PostgreSQL cannot store as it is (NUL, a lone surrogate a plug-in yielded) is stored in an
escaped form, marked as such, and given back as it was: every client's reply equals the stored
one byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

StoredPart = str | tuple[str, Any]  # a text part, or (name, payload) of a data part


def storable(text: str) -> tuple[str, bool]:
    """(what to store, whether it is escaped)."""
    if "\x00" not in text:
        try:
            text.encode("utf-8")
            return text, False
        except UnicodeEncodeError:
            pass  # a lone surrogate
    return json.dumps(text)[1:-1], True


def restore(stored: str, escaped: bool) -> str:
    return json.loads(f'"{stored}"') if escaped else stored


def pack(parts: Sequence[StoredPart]) -> tuple[str, str]:
    """(the reply's text, its layout)."""
    layout: list[Any] = []
    for p in parts:
        if isinstance(p, str):
            layout.append(len(p))
        else:
            name, payload = p
            layout.append([name, payload])
    text = "".join(p for p in parts if isinstance(p, str))
    return text, json.dumps(layout, separators=(",", ":"))


def unpack(text: str, layout: str | None) -> list[StoredPart]:
    """The parts back from the text and its layout (no layout: stored before there was one,
    the text as one part)."""
    if layout is None:
        return [text] if text else []
    parts: list[StoredPart] = []
    at = 0
    for item in json.loads(layout):
        if isinstance(item, int):
            parts.append(text[at : at + item])
            at += item
        else:
            parts.append((str(item[0]), item[1]))
    return parts


def merged(parts: Sequence[StoredPart]) -> list[dict[str, Any]]:
    """The parts as a conversation shows them: adjacent text merged, data as they came."""
    out: list[dict[str, Any]] = []
    for p in parts:
        if isinstance(p, str):
            if out and out[-1]["type"] == "text":
                out[-1]["text"] += p
            else:
                out.append({"type": "text", "text": p})
        else:
            out.append({"type": "data", "name": p[0], "payload": p[1]})
    return out
