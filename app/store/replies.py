"""How a reply is stored: its text, and a layout that gives back its parts by index exactly.

A stored reply is read back part by part (a client resuming at part n of an ended run gets
parts n.. from here, streams/relay.py), so the text alone is not enough: `layout` lists the
parts in order, one line each: a text part as its length in code points (its text is the
next slice of the content), a data part as `[name, payload]`. Each line is ASCII JSON, so the
layout holds any payload, NUL included (PostgreSQL's jsonb refuses it), and a reader can take
it in slices of whole lines without holding all of it (a reply of 100,000 data parts).

Text PostgreSQL cannot store as it is (NUL, a lone surrogate a plug-in yielded) is stored in an
escaped form, marked as such, and given back as it was: every client's reply equals the stored
one byte for byte. The escaped form is a JSON string's body with every surrogate written as an
escape of its own (a character beyond the BMP stays one character), read back escape by escape:
a lone high surrogate and a lone low one that happen to meet stay two code points, as they
came (json.loads would join them into one character and the layout's lengths would no longer
fit the text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

StoredPart = str | tuple[str, Any]  # a text part, or (name, payload) of a data part


_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|(.))", re.DOTALL)
_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}  # else the character itself


def storable(text: str) -> tuple[str, bool]:
    """(what to store, whether it is escaped)."""
    if "\x00" not in text and _SURROGATE.search(text) is None:
        return text, False
    return escape(text), True


def escape(text: str) -> str:
    """A JSON string's body for `text`, each surrogate an escape of its own."""
    body = json.dumps(text, ensure_ascii=False)[1:-1]
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", body)


def unescape(body: str) -> str:
    """`escape` undone, escape by escape (a surrogate pair's escapes stay two code points)."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 16)) if m[1] else _SIMPLE.get(m[2], m[2]), body)


def restore(stored: str, escaped: bool) -> str:
    return unescape(stored) if escaped else stored


def pack(parts: Sequence[StoredPart]) -> tuple[str, str]:
    """(the reply's text, its layout)."""
    lines = [
        str(len(p)) if isinstance(p, str) else json.dumps([p[0], p[1]], separators=(",", ":"))
        for p in parts
    ]
    text = "".join(p for p in parts if isinstance(p, str))
    return text, "\n".join(lines)


def unpack(text: str, layout: str | None) -> list[StoredPart]:
    """The parts back from the text and its layout (no layout: stored before there was one,
    the text as one part)."""
    if layout is None:
        return [text] if text else []
    parts: list[StoredPart] = []
    at = 0
    for line in layout.split("\n") if layout else ():
        if line[0] != "[":
            n = int(line)
            parts.append(text[at : at + n])
            at += n
        else:
            name, payload = json.loads(line)
            parts.append((str(name), payload))
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
