"""Pages of a thread's runs and messages, newest first, read in bounded pieces.

A page is read in two steps, so that what a request holds does not grow with what it reads:
its heads (ids, statuses, times and the size of each stored value: small rows, one query),
then the values, small ones a batch at a time (BATCH_BYTES) and a large one in pieces of about
SLICE_BYTES: a text in byte slices, a message's parts in ranges of whole parts (a message of
100,000 data parts is 7 MB of JSON; eight clients reading it at once held 121 MiB each when
a page was read whole). A range is cut to about SLICE_BYTES from the size of the parts read
so far, so one part larger than that is held whole. Each query borrows a pool connection and
returns it: a client that reads slowly holds no connection, only the piece in hand.

Values come back as stored: a message's `content` as UTF-8 bytes, its `parts` as the JSON
text PostgreSQL writes for jsonb (never parsed here). Reads are filtered by the reader in the
statement that lists heads (`reader`, as in store/runs.py); values are read by key afterwards
(messages are written once: a head's values do not change under the reader).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from .db import Database

SLICE_BYTES = 256 * 1024  # a value past this is read (and held) one slice at a time
BATCH_BYTES = 256 * 1024  # small values are read together, up to about this much

Field = Literal["content", "parts"]
_FIELDS: dict[Field, str] = {"content": "m.content", "parts": "m.parts::text"}
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
    parts_count: int | None  # None: a text-only message (no parts stored)
    parts_stored: int | None  # bytes on disk, compressed: their JSON may be several times more


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


async def message_heads(
    db: Database,
    thread_id: str,
    *,
    limit: int,
    before: tuple[int, int] | None = None,
    reader: str | None = None,
) -> list[MessageHead]:
    """Up to `limit` messages of the thread, newest first, older than `before` (a head's
    `(seq, order)`), if `reader` (None: anyone) may see the thread."""
    seq, order = before if before is not None else (None, None)
    async with db.pool.connection() as conn:
        # The runs first (by the runs_thread_seq index), then their messages: a page costs
        # what it holds, not what the thread holds.
        cur = await conn.execute(
            f"""WITH page AS (
                    SELECT r.run_id, r.seq FROM threadgate.runs r
                    WHERE r.thread_id = %(thread)s
                      AND (%(seq)s::bigint IS NULL OR r.seq <= %(seq)s) {_READER}
                    ORDER BY r.seq DESC LIMIT %(limit)s)
                SELECT m.run_id, m.role, m.status, m.created_at, page.seq,
                       {_ROLE_ORDER} AS "order",
                       octet_length(m.content) AS content_bytes,
                       CASE jsonb_typeof(m.parts) WHEN 'array'
                            THEN jsonb_array_length(m.parts) END AS parts_count,
                       pg_column_size(m.parts) AS parts_stored
                FROM page JOIN threadgate.messages m ON m.run_id = page.run_id
                WHERE %(seq)s::bigint IS NULL
                   OR (page.seq, {_ROLE_ORDER}) < (%(seq)s::bigint, %(order)s::int)
                ORDER BY page.seq DESC, "order" DESC LIMIT %(limit)s""",
            {"thread": thread_id, "seq": seq, "order": order, "limit": limit, "reader": reader},
        )
        return [MessageHead(**row) for row in await cur.fetchall()]


_RUN_HEAD = """
    SELECT r.run_id, r.thread_id, r.seq, r.status, r.attempt, r.executor, r.accepted_by,
           r.multitask_strategy, r.error, r.created_at, r.started_at, r.finished_at,
           r.attempts, octet_length(m.content) AS output_bytes
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
    get_run reads the reply's parts too, as Python objects: 39 MiB for one of 100,000.)"""
    async with db.pool.connection() as conn:
        cur = await conn.execute(
            f"{_RUN_HEAD} WHERE r.run_id = %(run)s AND r.thread_id = %(thread)s {_READER}",
            {"run": run_id, "thread": thread_id, "reader": reader},
        )
        row = await cur.fetchone()
    return RunHead(**row) if row else None


Key = tuple[str, str]  # (run_id, role)


async def small_values(
    db: Database, keys: list[Key], fields: tuple[Field, ...]
) -> dict[Key, dict[Field, bytes | None]]:
    """The `fields` of these messages, whole: for values whose sizes the caller knows to be
    small together (a batch of up to about BATCH_BYTES)."""
    if not keys:
        return {}
    columns = ", ".join(f"convert_to({_FIELDS[f]}, 'UTF8') AS {f}" for f in fields)
    async with db.pool.connection() as conn:
        cur = conn.cursor(binary=True)  # bytea as bytes, not as hex text twice the size
        await cur.execute(
            f"""SELECT m.run_id, m.role, {columns} FROM threadgate.messages m
                JOIN unnest(%s::text[], %s::text[]) AS k(run_id, role)
                  ON m.run_id = k.run_id AND m.role = k.role""",
            ([k[0] for k in keys], [k[1] for k in keys]),
        )
        rows: list[dict[str, Any]] = await cur.fetchall()
    return {(r["run_id"], r["role"]): {f: r[f] for f in fields} for r in rows}


async def text_slices(
    db: Database, key: Key, size: int, slice_bytes: int = SLICE_BYTES
) -> AsyncIterator[bytes]:
    """A message's content (`size` bytes of UTF-8) in byte slices of `slice_bytes`, each read
    by a query of its own (no connection is held between two slices)."""
    for offset in range(0, size, slice_bytes):
        async with db.pool.connection() as conn:
            cur = conn.cursor(binary=True)
            await cur.execute(
                """SELECT substring(convert_to(m.content, 'UTF8') FROM %s FOR %s) AS piece
                   FROM threadgate.messages m WHERE m.run_id = %s AND m.role = %s""",
                (offset + 1, slice_bytes, key[0], key[1]),
            )
            row: dict[str, Any] | None = await cur.fetchone()
        if row is None or not row["piece"]:
            return  # cannot happen (messages are written once); ends the value short
        yield bytes(row["piece"])


async def part_ranges(
    db: Database, key: Key, count: int, slice_bytes: int = SLICE_BYTES
) -> AsyncIterator[bytes]:
    """A message's parts (a JSON array of `count` parts) as JSON text, read a range of parts
    at a time: each range about `slice_bytes`, judged by the parts read before it.

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
            break  # cannot happen (messages are written once); ends the value short
        inner = bytes(row["piece"])[1:-1]  # "[a, b]": the parts without their brackets
        yield (b", " if start else b"") + inner
        per_part = max(1, len(inner) // (end - start + 1))
        start, size = end + 1, max(1, min(10_000, slice_bytes // per_part))
    yield b"]"
