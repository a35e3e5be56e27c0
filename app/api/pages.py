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
import codecs
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic_core
from fastapi.responses import StreamingResponse

from ..errors import InvalidCursor, InvalidRequest
from ..settings import Settings
from ..store import pages
from ..store.db import Database
from ..store.pages import BATCH_BYTES, SLICE_BYTES, Field, Key, MessageHead, RunHead

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


def _text(value: bytes | None) -> bytes:
    """A stored text (UTF-8) as a JSON string."""
    if value is None:
        return b"null"
    return json.dumps(value.decode("utf-8"), ensure_ascii=False).encode()


async def _text_slices(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stored text read in slices, as one JSON string (a slice may cut a character in
    two: the decoder keeps its first bytes for the next slice)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    yield b'"'
    async for piece in pieces:
        text = decoder.decode(piece)
        if text:
            yield json.dumps(text, ensure_ascii=False)[1:-1].encode()
    yield json.dumps(decoder.decode(b"", final=True), ensure_ascii=False)[1:-1].encode() + b'"'


@dataclass(frozen=True, slots=True)
class Value:
    """A value to write: its field, its size in bytes (about: parts are known by their stored
    size), and for parts their number. `size` None: absent (null)."""

    field: Field
    size: int | None
    count: int = 0

    @property
    def large(self) -> bool:
        if self.size is None:
            return False
        return self.size > SLICE_BYTES and (self.field == "content" or self.count > 1)


def _parts(count: int | None, stored: int | None) -> Value:
    # jsonb compresses: its JSON text is often several times what it takes on disk.
    return Value("parts", None if count is None else 8 * (stored or 0), count or 0)


def _groups(values: Sequence[Sequence[Value]]) -> list[list[int]]:
    """The heads' indexes grouped for reading: neighbours whose values are small, up to about
    BATCH_BYTES together; a head with a large value alone (it is read in pieces)."""
    groups: list[list[int]] = []
    total = 0
    for i, vs in enumerate(values):
        size = sum(v.size or 0 for v in vs)
        if any(v.large for v in vs):
            groups.append([i])
            total = BATCH_BYTES + 1  # nothing joins it
        elif groups and total + size <= BATCH_BYTES and len(groups[-1]) < 1000:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


async def _values(
    db: Database, keys: Sequence[Key], values: Sequence[Sequence[Value]]
) -> AsyncIterator[tuple[int, list[bytes | AsyncIterator[bytes] | None]]]:
    """Each head's values, in order: whole bytes when small, an iterator of pieces when large
    (consume it before asking for the next head's)."""
    for group in _groups(values):
        whole = sorted({v.field for i in group for v in values[i] if v.size and not v.large})
        read = await pages.small_values(db, [keys[i] for i in group], tuple(whole)) if whole else {}
        for i in group:
            out: list[bytes | AsyncIterator[bytes] | None] = []
            for v in values[i]:
                if v.size is None:
                    out.append(None)
                elif not v.large:
                    out.append(read.get(keys[i], {}).get(v.field))
                elif v.field == "content":
                    out.append(pages.text_slices(db, keys[i], v.size))
                else:
                    out.append(pages.part_ranges(db, keys[i], v.count))
            yield i, out


async def _value(value: bytes | AsyncIterator[bytes] | None, *, text: bool) -> AsyncIterator[bytes]:
    """A value as JSON: a text as a string, stored JSON (parts) as it is."""
    if value is None:
        yield b"null"
    elif isinstance(value, bytes):
        yield _text(value) if text else value
    elif text:
        async for piece in _text_slices(value):
            yield piece
    else:
        async for piece in value:
            yield piece


async def _page(
    opening: bytes,
    db: Database,
    keys: Sequence[Key],
    values: Sequence[Sequence[Value]],
    head: Callable[[int], dict[str, Any]],
    names: Sequence[str],
    closing: bytes = b"]}",
) -> AsyncIterator[bytes]:
    """`opening`, the objects (each head's members, then its values under `names`), comma
    separated, `closing`."""
    yield opening
    async for i, read in _values(db, keys, values):
        yield (b"," if i else b"") + _open(head(i))
        for name, v, value in zip(names, values[i], read, strict=True):
            yield f',"{name}":'.encode()
            async for piece in _value(value, text=v.field == "content"):
                yield piece
        yield b"}"
    yield closing


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
            [
                (Value("content", h.content_bytes), _parts(h.parts_count, h.parts_stored))
                for h in heads
            ],
            head,
            ("content", "parts"),
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


def runs_page(
    db: Database, heads: list[RunHead], next_cursor: str | None, next_before: int | None
) -> JsonStream:
    """`{"next_cursor", "next_before", "runs": [...]}`, each run with its `output`."""
    opening = _open({"next_cursor": next_cursor, "next_before": next_before}) + b',"runs":['
    return JsonStream(
        _page(
            opening,
            db,
            [(h.run_id, "assistant") for h in heads],
            [(Value("content", h.output_bytes),) for h in heads],
            lambda i: _run(heads[i]),
            ("output",),
        )
    )


def run_answer(db: Database, head: RunHead) -> JsonStream:
    """One run with its `output`, as GET /threads/{t}/runs/{id} answers it."""
    return JsonStream(
        _page(
            b"",
            db,
            [(head.run_id, "assistant")],
            [(Value("content", head.output_bytes),)],
            lambda i: _run(head),
            ("output",),
            closing=b"",
        )
    )
