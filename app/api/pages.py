"""Paged listings as streamed JSON: a thread's messages and runs, newest first, opaque cursors.

Newest first because that is what a chat opens on: its latest turns, then older ones as the
reader scrolls back (the page puts them above what it shows). Each page carries `next_cursor`,
an opaque string for the next (older) page; null on the last one. A page is written as it is
read (store/pages.py): what a request holds is one batch or one slice of a value, whatever
the page's size, and no value is copied twice into the answer.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pydantic_core
from fastapi.responses import StreamingResponse

from ..errors import InvalidCursor, InvalidRequest
from ..settings import Settings
from ..store import pages
from ..store.db import Database
from ..store.pages import BATCH_BYTES, SLICE_BYTES, Key, MessageHead, RunHead, Stored

MAX_SEQ = 2**63 - 1  # a bigint


class JsonStream(StreamingResponse):
    media_type = "application/json"


def page_limit(settings: Settings, limit: int | None) -> int:
    """The page size a client asked for (the default when none), within the server's bound."""
    if limit is None:
        return settings.page_limit_default
    if not 1 <= limit <= settings.page_limit_max:
        raise InvalidRequest(
            f"limit must be from 1 to {settings.page_limit_max} (THREADGATE_PAGE_LIMIT_MAX)"
        )
    return limit


def encode_cursor(kind: str, *numbers: int) -> str:
    text = ":".join([kind, *map(str, numbers)])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str, arity: int) -> tuple[int, ...]:
    """A cursor this route gave, as its numbers; InvalidCursor (400) for anything else."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii")
    except (UnicodeError, ValueError, binascii.Error):
        raise InvalidCursor() from None
    parts = text.split(":")
    if parts[0] != kind or len(parts) != arity + 1:
        raise InvalidCursor()
    if not all(p.isascii() and p.isdigit() and len(p) <= 19 for p in parts[1:]):
        raise InvalidCursor()
    numbers = tuple(int(p) for p in parts[1:])
    if not all(0 <= n <= MAX_SEQ for n in numbers):
        raise InvalidCursor()
    return numbers


def message_cursor(head: MessageHead) -> str:
    return encode_cursor("m1", head.seq, head.order)


def run_cursor(head: RunHead) -> str:
    return encode_cursor("r1", head.seq)


# ---- writing a page -------------------------------------------------------------------------


def _json(value: Any) -> bytes:
    return pydantic_core.to_json(value)


def _open(head: dict[str, Any]) -> bytes:
    """A JSON object's first members, left open for the values that follow."""
    return _json(head)[:-1]


async def _null() -> AsyncIterator[bytes]:
    yield b"null"


async def _bytes(value: str) -> AsyncIterator[bytes]:
    yield value.encode()


Values = Callable[[Stored | None], list[AsyncIterator[bytes]]]


def _groups(sizes: Sequence[int]) -> list[list[int]]:
    """The heads' indexes grouped for reading: neighbours whose values are small, up to about
    BATCH_BYTES together; a head with a large value alone (it is read in pieces)."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if size > SLICE_BYTES:
            groups.append([i])
            total = BATCH_BYTES + 1  # nothing joins it
        elif groups and total + size <= BATCH_BYTES and len(groups[-1]) < 1000:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


async def _page(
    opening: bytes,
    db: Database,
    keys: Sequence[Key | None],
    sizes: Sequence[int],
    values: Sequence[Values],
    head: Callable[[int], dict[str, Any]],
    names: Sequence[str],
    *,
    layouts: bool,
    closing: bytes = b"]}",
) -> AsyncIterator[bytes]:
    """`opening`, the objects (each head's members, then its values under `names`), comma
    separated, `closing`. A head's values come from its stored values read whole with its
    group's (`values(stored)`), or, when large, read in pieces (`values(None)`); a head
    without a key has none stored."""
    yield opening
    for group in _groups(sizes):
        small = [k for i in group if (k := keys[i]) is not None and sizes[i] <= SLICE_BYTES]
        read = await pages.small_values(db, small, layouts=layouts) if small else {}
        for i in group:
            key = keys[i]
            stored = read.get(key) if key is not None else None
            if key is not None and sizes[i] <= SLICE_BYTES and stored is None:
                stored = Stored("", None, None)  # gone since its head was read (retention)
            yield (b"," if i else b"") + _open(head(i))
            for name, value in zip(names, values[i](stored), strict=True):
                yield f',"{name}":'.encode()
                async for piece in value:
                    yield piece
            yield b"}"
    yield closing


def _message_values(db: Database, h: MessageHead) -> Values:
    """A message's `content` and `parts` (null for a text-only message: its content says it
    all), from its stored values or read in pieces."""
    key = (h.run_id, h.role)

    def values(stored: Stored | None) -> list[AsyncIterator[bytes]]:
        def content() -> AsyncIterator[str]:
            if stored:
                return pages.one(stored.content)
            return pages.chars(db, key, "content", h.content_bytes)

        parts: AsyncIterator[bytes]
        if h.has_data:
            layout = (
                pages.one(stored.layout or "")
                if stored
                else pages.chars(db, key, "layout", h.layout_bytes or 0, pages.LINES_BYTES)
            )
            text = pages.unescaped(content()) if h.escaped else content()
            parts = pages.parts_json(layout, text, ascii_only=h.escaped)
        elif h.legacy_parts is not None:
            parts = (
                _bytes(stored.parts or "[]")
                if stored
                else pages.part_ranges(db, key, h.legacy_parts)
            )
        else:
            parts = _null()
        return [pages.text_json(content(), escaped=h.escaped), parts]

    return values


def messages_page(
    db: Database, thread_id: str, heads: list[MessageHead], next_cursor: str | None
) -> JsonStream:
    """`{"thread_id", "next_cursor", "messages": [...]}`: each message's `content`, and its
    `parts` when it has data parts (null for a text-only message: its content says it all)."""
    opening = _open({"thread_id": thread_id, "next_cursor": next_cursor}) + b',"messages":['

    def head(i: int) -> dict[str, Any]:
        h = heads[i]
        return {
            "run_id": h.run_id,
            "role": h.role,
            "status": h.status,
            "created_at": h.created_at,
        }

    return JsonStream(
        _page(
            opening,
            db,
            [(h.run_id, h.role) for h in heads],
            [h.size for h in heads],
            [_message_values(db, h) for h in heads],
            head,
            ("content", "parts"),
            layouts=True,
        )
    )


def _run(h: RunHead) -> dict[str, Any]:
    return {
        "run_id": h.run_id,
        "thread_id": h.thread_id,
        "status": h.status,
        "attempt": h.attempt,
        "executor": h.executor,
        "accepted_by": h.accepted_by,
        "multitask_strategy": h.multitask_strategy,
        "created_at": h.created_at,
        "started_at": h.started_at,
        "finished_at": h.finished_at,
        "error": h.error,
        "attempts": h.attempts,
    }


def _output(db: Database, h: RunHead) -> Values:
    """A run's `output`: its reply's text (null before one is stored)."""
    key = (h.run_id, "assistant")

    def values(stored: Stored | None) -> list[AsyncIterator[bytes]]:
        if h.output_bytes is None:
            return [_null()]
        text = (
            pages.one(stored.content) if stored else pages.chars(db, key, "content", h.output_bytes)
        )
        return [pages.text_json(text, escaped=h.output_escaped)]

    return values


def _run_values(
    db: Database, heads: Sequence[RunHead]
) -> tuple[list[Key | None], list[int], list[Values]]:
    return (
        [(h.run_id, "assistant") if h.output_bytes is not None else None for h in heads],
        [h.output_bytes or 0 for h in heads],
        [_output(db, h) for h in heads],
    )


def runs_page(
    db: Database, heads: list[RunHead], next_cursor: str | None, next_before: int | None
) -> JsonStream:
    """`{"next_cursor", "next_before", "runs": [...]}`, each run with its `output`."""
    opening = _open({"next_cursor": next_cursor, "next_before": next_before}) + b',"runs":['
    return JsonStream(
        _page(
            opening,
            db,
            *_run_values(db, heads),
            lambda i: _run(heads[i]),
            ("output",),
            layouts=False,
        )
    )


def run_answer(db: Database, head: RunHead) -> JsonStream:
    """One run with its `output`, as GET /threads/{t}/runs/{id} answers it."""
    return JsonStream(
        _page(
            b"",
            db,
            *_run_values(db, [head]),
            lambda i: _run(head),
            ("output",),
            layouts=False,
            closing=b"",
        )
    )
