"""Pages of a thread's runs and messages, newest first, read and written in bounded pieces.

A page is read in two steps, so that what a request holds does not grow with what it reads:
its heads (ids, statuses, times and the size of each stored value: small rows, one query),
then the values, small ones a batch at a time (BATCH_BYTES) and a large one in pieces of about
SLICE_BYTES. Each query borrows a pool connection and returns it: a client that reads slowly
holds no connection, only the piece in hand.

A reply is stored as its text and a layout (store/replies.py): one ASCII line per part, a text
part as its length in code points (its text is the next slice of the content), a data part as
`[name, payload]`. A large reply is written as it is read: its layout and its content in byte
slices (decoded as they come: a character a slice cuts is completed by the next), the layout
taken a line at a time, each text part the next code points of the content, adjacent ones
merged, each data part's JSON passed through as stored. A message of 100,000 data parts is
~6 MB of JSON; eight clients reading it at once held 121 MiB each when a page was read whole.

Content PostgreSQL cannot hold as it is (NUL, a lone surrogate) is stored escaped, in the form
of a JSON string's body: written as such, and read back for its parts by slices that never
cut an escape (nor the two escapes of a surrogate pair, which read as one character).

Rows written before layouts keep their parts as jsonb: read in ranges of whole parts
(`part_ranges`). Reads are filtered by the reader in the statement that lists heads
(`reader`, as in store/runs.py); values are read by key afterwards.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, Literal

from .db import Database
from .replies import unescape
from .runs import TERMINAL

SLICE_BYTES = 256 * 1024  # a value past this is read (and held) one slice at a time
BATCH_BYTES = 256 * 1024  # small values are read together, up to about this much
# A layout is read in smaller slices, and parts written in smaller pieces: each line and each
# part is a Python object while it is written (a slice of 256 KiB was ~8,000 of them).
LINES_BYTES = 64 * 1024

# Over runs `r`: the thread's owner must be the reader (NULL: anyone), as in store/runs.py.
_READER = """AND (%(reader)s::text IS NULL OR EXISTS (
    SELECT 1 FROM threadgate.threads t WHERE t.thread_id = r.thread_id AND t.owner = %(reader)s))"""
# A message's place in its run: the user's first, the reply second.
_ROLE_ORDER = "CASE m.role WHEN 'user' THEN 0 ELSE 1 END"


@dataclass(frozen=True, slots=True)
class MessageHead:
    run_id: str
    role: str
    status: str
    created_at: datetime
    seq: int  # the run's order on its thread
    order: int  # 0: the user's message, 1: the reply
    content_bytes: int
    escaped: bool  # content stored escaped (a JSON string's body)
    layout_bytes: int | None  # None: no layout (a user message, or a reply stored before)
    has_data: bool  # its layout has a data part (else the content is the whole message)
    legacy_parts: int | None  # a reply stored before layouts, with data: its jsonb parts
    legacy_stored: int | None  # their bytes on disk, compressed: their JSON may be more

    @property
    def size(self) -> int:
        """About what reading its values holds, whole."""
        return self.content_bytes + (self.layout_bytes or 0) + 8 * (self.legacy_stored or 0)


@dataclass(frozen=True, slots=True)
class RunHead:
    """A run as a listing shows it; its `output` (the reply's text) is read as a value."""

    run_id: str
    thread_id: str
    seq: int
    status: str
    attempt: int
    executor: str | None
    accepted_by: str
    multitask_strategy: str
    error: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: list[dict[str, Any]]
    output_bytes: int | None  # None: no reply stored
    output_escaped: bool


async def message_heads(
    db: Database,
    thread_id: str,
    *,
    limit: int,
    before: tuple[int, int] | None = None,
    reader: str | None = None,
) -> list[MessageHead]:
    """Up to `limit` messages of the thread, newest first, older than `before` (a head's
    `(seq, order)`), if `reader` (None: anyone) may see the thread. A reply shows once its
    run has ended (as store.messages: the reply of a run still going is not final)."""
    seq, order = before if before is not None else (None, None)
    async with db.pool.connection() as conn:
        # The runs first (by the runs_thread_seq index), then their messages: a page costs
        # what it holds, not what the thread holds. Each run has its user message: `limit`
        # runs give at least `limit` messages.
        cur = await conn.execute(
            f"""WITH page AS (
                    SELECT r.run_id, r.seq, r.status FROM threadgate.runs r
                    WHERE r.thread_id = %(thread)s
                      AND (%(seq)s::bigint IS NULL OR r.seq <= %(seq)s) {_READER}
                    ORDER BY r.seq DESC LIMIT %(limit)s)
                SELECT m.run_id, m.role, m.status, m.created_at, page.seq,
                       {_ROLE_ORDER} AS "order",
                       octet_length(m.content) AS content_bytes, m.escaped,
                       octet_length(m.layout) AS layout_bytes,
                       coalesce(strpos(m.layout, '[') > 0, false) AS has_data,
                       CASE WHEN m.layout IS NULL AND jsonb_typeof(m.parts) = 'array'
                            THEN jsonb_array_length(m.parts) END AS legacy_parts,
                       CASE WHEN m.layout IS NULL THEN pg_column_size(m.parts) END
                           AS legacy_stored
                FROM page JOIN threadgate.messages m ON m.run_id = page.run_id
                WHERE (m.role = 'user' OR page.status = ANY(%(terminal)s))
                  AND (%(seq)s::bigint IS NULL
                       OR (page.seq, {_ROLE_ORDER}) < (%(seq)s::bigint, %(order)s::int))
                ORDER BY page.seq DESC, "order" DESC LIMIT %(limit)s""",
            {
                "thread": thread_id,
                "seq": seq,
                "order": order,
                "limit": limit,
                "reader": reader,
                "terminal": list(TERMINAL),
            },
        )
        return [MessageHead(**row) for row in await cur.fetchall()]


_RUN_HEAD = """
    SELECT r.run_id, r.thread_id, r.seq, r.status, r.attempt, r.executor, r.accepted_by,
           r.multitask_strategy, r.error, r.created_at, r.started_at, r.finished_at,
           r.attempts, octet_length(m.content) AS output_bytes,
           coalesce(m.escaped, false) AS output_escaped
    FROM threadgate.runs r
    LEFT JOIN threadgate.messages m ON m.run_id = r.run_id AND m.role = 'assistant'
"""


async def run_heads(
    db: Database,
    thread_id: str,
    *,
    limit: int,
    before: int | None = None,
    reader: str | None = None,
) -> list[RunHead]:
    """Up to `limit` runs of the thread, newest first, accepted before the run of seq
    `before`, if `reader` (None: anyone) may see the thread."""
    async with db.pool.connection() as conn:
        cur = await conn.execute(
            f"""{_RUN_HEAD}
                WHERE r.thread_id = %(thread)s
                  AND (%(before)s::bigint IS NULL OR r.seq < %(before)s) {_READER}
                ORDER BY r.seq DESC LIMIT %(limit)s""",
            {"thread": thread_id, "before": before, "reader": reader, "limit": limit},
        )
        return [RunHead(**row) for row in await cur.fetchall()]


async def run_head(
    db: Database, thread_id: str, run_id: str, *, reader: str | None = None
) -> RunHead | None:
    """One run of the thread, if `reader` (None: anyone) may see the thread. (The store's
    get_run reads the reply's whole text as one Python string.)"""
    async with db.pool.connection() as conn:
        cur = await conn.execute(
            f"{_RUN_HEAD} WHERE r.run_id = %(run)s AND r.thread_id = %(thread)s {_READER}",
            {"run": run_id, "thread": thread_id, "reader": reader},
        )
        row = await cur.fetchone()
    return RunHead(**row) if row else None


Key = tuple[str, str]  # (run_id, role)


@dataclass(frozen=True, slots=True)
class Stored:
    """A message's stored values, whole: its content as stored (escaped or not), its layout,
    and for a reply stored before layouts its jsonb parts as JSON text."""

    content: str
    layout: str | None
    parts: str | None


async def small_values(db: Database, keys: list[Key], *, layouts: bool) -> dict[Key, Stored]:
    """These messages' values, whole: for values whose sizes the caller knows to be small
    together (a batch of up to about BATCH_BYTES). `layouts` False: their content only."""
    if not keys:
        return {}
    more = (
        "m.layout, CASE WHEN m.layout IS NULL THEN m.parts::text END AS parts"
        if layouts
        else "NULL::text AS layout, NULL::text AS parts"
    )
    async with db.pool.connection() as conn:
        cur = await conn.execute(
            f"""SELECT m.run_id, m.role, m.content, {more} FROM threadgate.messages m
                JOIN unnest(%s::text[], %s::text[]) AS k(run_id, role)
                  ON m.run_id = k.run_id AND m.role = k.role""",
            ([k[0] for k in keys], [k[1] for k in keys]),
        )
        rows: list[dict[str, Any]] = await cur.fetchall()
    return {(r["run_id"], r["role"]): Stored(r["content"], r["layout"], r["parts"]) for r in rows}


async def chars(
    db: Database,
    key: Key,
    column: Literal["content", "layout"],
    size: int,
    slice_bytes: int = SLICE_BYTES,
) -> AsyncIterator[str]:
    """A message's stored text (`size` bytes of UTF-8, as stored: escaped content stays
    escaped) in byte slices of `slice_bytes`, each read by a query of its own (no connection
    is held between two), decoded as they come (a character a slice cuts is kept whole for
    the next).

    Slices of the text's bytes (convert_to) cost PostgreSQL a third of slices of its characters
    (substring of text counts characters from the start each time): measured on a layout of
    3.3 MB in 51 slices, 0.22 s against 0.78 s."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for offset in range(0, size, slice_bytes):
        async with db.pool.connection() as conn:
            cur = conn.cursor(binary=True)  # bytea as bytes, not as hex text twice the size
            await cur.execute(
                f"""SELECT substring(convert_to(m.{column}, 'UTF8') FROM %s FOR %s) AS piece
                   FROM threadgate.messages m WHERE m.run_id = %s AND m.role = %s""",
                (offset + 1, slice_bytes, key[0], key[1]),
            )
            row: dict[str, Any] | None = await cur.fetchone()
        piece = bytes(row["piece"]) if row and row["piece"] is not None else b""
        text = decoder.decode(piece)
        if text:
            yield text
        if not piece:
            return  # the message is gone (retention): the value ends short


async def one(value: str) -> AsyncIterator[str]:
    """A value held whole, as the slices of one."""
    if value:
        yield value


# ---- escaped content ------------------------------------------------------------------------


def _opens_escape(text: str, at: int) -> bool:
    """Whether the backslash at `at` begins an escape (an even run of backslashes before it:
    each pair is one escaped backslash)."""
    j = at
    while j and text[j - 1] == "\\":
        j -= 1
    return (at - j) % 2 == 0


def escape_cut(text: str) -> int:
    """Where escaped text (replies.escape) may be cut so that each side reads as it does
    within the whole: never within an escape."""
    n = len(text)
    k = text.rfind("\\", max(0, n - 6))  # an escape is at most 6 characters
    if (
        k >= 0
        and _opens_escape(text, k)
        and (k + 1 == n or k + (6 if text[k + 1] == "u" else 2) > n)
    ):
        n = k  # the cut would split it: cut before it
    return n


async def unescaped(pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    """Escaped content read in slices, as the text it stands for, slice by slice."""
    carry = ""
    async for piece in pieces:
        text = carry + piece
        cut = escape_cut(text)
        if cut:
            yield unescape(text[:cut])
        carry = text[cut:]
    if carry:
        yield unescape(carry)


# ---- values as JSON -------------------------------------------------------------------------


async def text_json(pieces: AsyncIterator[str], *, escaped: bool) -> AsyncIterator[bytes]:
    """A stored text as one JSON string. Escaped content is a JSON string's body already
    (replies.escape): passed through as stored, whatever it holds (NUL, a lone surrogate)."""
    yield b'"'
    async for piece in pieces:
        yield (piece if escaped else json.dumps(piece, ensure_ascii=False)[1:-1]).encode()
    yield b'"'


# Characters a JSON string must escape; for text that may hold a lone surrogate (escaped
# content, read back), anything but printable ASCII (written as an ASCII escape).
_NEEDS_ESCAPE = {False: re.compile(r'["\\\x00-\x1f]'), True: re.compile(r"[^ !#-\[\]-~]")}


async def _lines(pieces: AsyncIterator[str]) -> AsyncIterator[list[str]]:
    """A layout read in slices, as lists of whole lines (a line cut by a slice is kept for
    the next; one longer than a slice is held whole)."""
    carry = ""
    async for piece in pieces:
        lines = (carry + piece).split("\n")
        carry = lines.pop()
        if lines:
            yield lines
    if carry:
        yield [carry]


async def parts_json(
    layout: AsyncIterator[str],
    text: AsyncIterator[str],
    *,
    ascii_only: bool,
    slice_bytes: int = LINES_BYTES,
) -> AsyncIterator[bytes]:
    """A reply's parts as a JSON array, as a conversation shows them (replies.merged: adjacent
    text parts merged), from its layout and its text (content, unescaped), both read in
    slices; written in pieces of about `slice_bytes`. `ascii_only`: the text may hold lone
    surrogates (escaped content): written as ASCII escapes."""
    needs_escape = _NEEDS_ESCAPE[ascii_only]
    buf, at, plain = "", 0, True  # the slice of text in hand, how far it is used
    out: list[str] = ["["]
    size, count, in_text = 0, 0, False
    async for lines in _lines(layout):
        for line in lines:
            if line[0] == "[":  # a data part: ["name",payload], its JSON as stored
                name_end = scanstring(line, 2)[1]
                lead = '"},' if in_text else "," if count else ""
                out.append(
                    f'{lead}{{"type":"data","name":{line[1:name_end]},'
                    f'"payload":{line[name_end + 1 : -1]}}}'
                )
                size += len(line) + 30
                count += 1
                in_text = False
            else:  # a text part: its length, in code points
                n = int(line)
                if not in_text:
                    out.append(',{"type":"text","text":"' if count else '{"type":"text","text":"')
                    count += 1
                    in_text = True
                while n:
                    if at == len(buf):
                        buf, at = await anext(text, ""), 0
                        if not buf:
                            break  # the content is gone (retention): the part ends short
                        plain = needs_escape.search(buf) is None
                    piece = buf[at : at + n]
                    at += len(piece)
                    n -= len(piece)
                    size += len(piece)
                    out.append(piece if plain else json.dumps(piece, ensure_ascii=ascii_only)[1:-1])
                    if size >= slice_bytes:
                        yield "".join(out).encode()
                        out.clear()
                        size = 0
            if size >= slice_bytes:
                yield "".join(out).encode()
                out.clear()
                size = 0
    out.append('"}]' if in_text else "]")
    yield "".join(out).encode()


async def part_ranges(
    db: Database, key: Key, count: int, slice_bytes: int = SLICE_BYTES
) -> AsyncIterator[bytes]:
    """A reply stored before layouts: its jsonb parts (a JSON array of `count` parts) as JSON
    text, read a range of parts at a time: each range about `slice_bytes`, judged by the
    parts read before it.

    A range costs PostgreSQL one read of the stored array and the range's own JSON, not the
    whole array's (a byte slice of the array's text would convert all of it each time)."""
    yield b"["
    start, size = 0, 16
    while start < count:
        end = min(count, start + size) - 1
        async with db.pool.connection() as conn:
            cur = conn.cursor(binary=True)
            await cur.execute(
                """SELECT convert_to(jsonb_path_query_array(m.parts, %s::jsonpath)::text, 'UTF8')
                          AS piece
                   FROM threadgate.messages m WHERE m.run_id = %s AND m.role = %s""",
                (f"$[{start} to {end}]", key[0], key[1]),
            )
            row: dict[str, Any] | None = await cur.fetchone()
        if row is None or row["piece"] is None:
            break  # the message is gone (retention): the value ends short
        inner = bytes(row["piece"])[1:-1]  # "[a, b]": the parts without their brackets
        yield (b", " if start else b"") + inner
        per_part = max(1, len(inner) // (end - start + 1))
        start, size = end + 1, max(1, min(10_000, slice_bytes // per_part))
    yield b"]"
