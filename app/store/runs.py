"""Runs and messages of threads: the rows behind every status, listing and conversation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from .db import Database
from .replies import StoredPart, merged, pack, restore, storable, unpack

RunStatus = Literal["pending", "running", "success", "error", "cancelled", "interrupted"]
ACTIVE: tuple[str, ...] = ("pending", "running")
TERMINAL: tuple[str, ...] = ("success", "error", "cancelled", "interrupted")


@dataclass(slots=True)
class Run:
    run_id: str
    thread_id: str
    seq: int
    status: RunStatus
    attempt: int
    executor: str | None
    accepted_by: str
    input: str
    model_options: dict[str, Any]
    multitask_strategy: str
    idempotency_key: str | None
    request_hash: str | None
    stop_requested: str | None
    timeout_s: float | None
    error: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    replays: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    output: str | None = None
    output_status: str | None = None
    version: str | None = None  # the application version its workflow was queued under
    remaining_s: float | None = None  # of its time budget, by the database's clock

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclass(slots=True)
class Message:
    run_id: str
    role: str
    content: str
    status: str
    created_at: datetime
    parts: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class NewRun:
    run_id: str
    thread_id: str
    input: str
    model_options: dict[str, Any] = field(default_factory=dict)
    multitask_strategy: str = "enqueue"
    idempotency_key: str | None = None
    request_hash: str | None = None
    accepted_by: str = ""
    owner: str = ""
    timeout_s: float | None = None


class RunStore(Protocol):
    """What the API and the workflow need from the store."""

    async def get_run(self, thread_id: str, run_id: str) -> Run | None: ...
    async def latest_run(self, thread_id: str) -> Run | None: ...
    async def begin_attempt(
        self, run_id: str, executor: str, *, kind: str, timeout_s: float, begin: str
    ) -> Run | None: ...


_RUN_COLUMNS = """
    r.run_id, r.thread_id, r.seq, r.status, r.attempt, r.executor, r.accepted_by,
    coalesce(u.content, r.input) AS input, coalesce(u.escaped, false) AS input_escaped,
    r.model_options, r.multitask_strategy, r.idempotency_key, r.request_hash, r.stop_requested,
    r.timeout_s, r.error, r.created_at, r.started_at, r.finished_at, r.replays, r.attempts,
    m.content AS output, m.status AS output_status, coalesce(m.escaped, false) AS output_escaped
"""
# Appended to a query over runs `r`: the thread's owner must be the reader (%s twice; NULL:
# anyone may read).
_READER = """AND (%s::text IS NULL OR EXISTS (
    SELECT 1 FROM threadgate.threads t WHERE t.thread_id = r.thread_id AND t.owner = %s))"""
_REPLY_JOINS = """
    LEFT JOIN threadgate.messages m ON m.run_id = r.run_id AND m.role = 'assistant'
    LEFT JOIN threadgate.messages u ON u.run_id = r.run_id AND u.role = 'user'
"""
_RUN_FROM = f"FROM threadgate.runs r {_REPLY_JOINS}"


def _run(row: dict[str, Any]) -> Run:
    row["input"] = restore(row["input"] or "", row.pop("input_escaped"))
    escaped = row.pop("output_escaped")
    if row["output"] is not None:
        row["output"] = restore(row["output"], escaped)
    return Run(**row)


def _message(row: dict[str, Any]) -> Message:
    content = restore(row.pop("content"), row.pop("escaped"))
    layout, parts = row.pop("layout"), row.pop("parts")
    if layout is not None:
        parts = merged(unpack(content, layout))
    return Message(content=content, parts=parts, **row)


def _thread_lock_key(thread_id: str) -> str:
    return f"threadgate.thread:{thread_id}"


class PgRunStore:
    """The PostgreSQL implementation of the run store."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @contextlib.asynccontextmanager
    async def thread_lock(self, thread_id: str) -> AsyncIterator[AsyncConnection[Any]]:
        """Serialize accepting runs on one thread across pods (session advisory lock).

        Held across insert and enqueue, so the order of rows and the order of the queue agree.
        The server releases it if the process dies.
        """
        async with self.db.pool.connection() as conn:
            await conn.execute(
                "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (_thread_lock_key(thread_id),)
            )
            try:
                yield conn
            finally:
                await conn.execute(
                    "SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
                    (_thread_lock_key(thread_id),),
                )

    @contextlib.asynccontextmanager
    async def accepting(self, thread_id: str) -> AsyncIterator[AsyncConnection[Any]]:
        """One transaction for accepting a run on a thread: the thread's lock first (a
        transaction lock, so no unlock statement: it goes at commit, or with the session if
        the process dies), then the caller's reads, the run's insert and its workflow's
        enqueue row. All of it commits or none of it does: no run without its workflow.

        The lock is its own statement: a read in the same statement would see a snapshot
        taken before the lock was granted.
        """
        async with self.db.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (_thread_lock_key(thread_id),),
            )
            yield conn

    async def principal_lock(self, conn: AsyncConnection[Any], owner: str) -> None:
        """Serialize counting and accepting one principal's runs across pods until the
        accept's transaction ends (always taken after the thread's: no lock-order cycle)."""
        key = f"threadgate.principal:{owner}"
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))

    async def count_active(
        self, conn: AsyncConnection[Any], *, owner: str | None, accepted_by: str
    ) -> tuple[int, int]:
        """Pending and running runs: those of `owner`'s threads (0 for None) and those
        `accepted_by` accepted. One pass over the active runs (runs_active): the limits keep
        them few, whatever the number of threads."""
        cur = await conn.execute(
            """SELECT count(*) FILTER (WHERE t.owner = %s) AS owner,
                      count(*) FILTER (WHERE r.accepted_by = %s) AS pod
               FROM threadgate.runs r JOIN threadgate.threads t ON t.thread_id = r.thread_id
               WHERE r.status IN ('pending', 'running')""",
            (owner, accepted_by),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row["owner"]), int(row["pod"])

    async def insert_run(self, conn: AsyncConnection[Any], new: NewRun) -> Run:
        """Record an accepted run and its user message: one statement (foreign keys are
        checked at the statement's end). Its `created_at` is the clock now, not the
        transaction's start: the accept's transaction began before the thread's lock was
        granted, and the thread's runs are created in the order they took it."""
        cur = await conn.execute(
            f"""WITH t AS (
                    INSERT INTO threadgate.threads (thread_id, owner) VALUES (%s, %s)
                    ON CONFLICT (thread_id) DO NOTHING),
                r AS (
                    INSERT INTO threadgate.runs (run_id, thread_id, accepted_by,
                        model_options, multitask_strategy, idempotency_key, request_hash,
                        timeout_s, created_at)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, clock_timestamp())
                    RETURNING *),
                u AS (
                    INSERT INTO threadgate.messages (run_id, role, thread_id, content, escaped)
                    SELECT run_id, 'user', thread_id, %s, %s FROM r
                    RETURNING content, escaped)
                SELECT {_RUN_COLUMNS} FROM r CROSS JOIN u
                LEFT JOIN threadgate.messages m ON false""",
            (
                new.thread_id,
                new.owner,
                new.run_id,
                new.thread_id,
                new.accepted_by,
                Jsonb(new.model_options),
                new.multitask_strategy,
                new.idempotency_key,
                new.request_hash,
                new.timeout_s,
                *storable(new.input),
            ),
        )
        row = await cur.fetchone()
        assert row is not None
        return _run(row)

    async def get_run(
        self,
        thread_id: str,
        run_id: str,
        *,
        conn: AsyncConnection[Any] | None = None,
        reader: str | None = None,
    ) -> Run | None:
        """The run, if `reader` (a principal; None: anyone) may see its thread."""
        query = (
            f"SELECT {_RUN_COLUMNS} {_RUN_FROM} WHERE r.run_id = %s AND r.thread_id = %s {_READER}"
        )
        args = (run_id, thread_id, reader, reader)
        if conn is not None:
            cur = await conn.execute(query, args)
            row = await cur.fetchone()
        else:
            async with self.db.pool.connection() as c:
                cur = await c.execute(query, args)
                row = await cur.fetchone()
        return _run(row) if row else None

    async def find_by_key(self, conn: AsyncConnection[Any], thread_id: str, key: str) -> Run | None:
        cur = await conn.execute(
            f"SELECT {_RUN_COLUMNS} {_RUN_FROM} WHERE r.thread_id = %s AND r.idempotency_key = %s",
            (thread_id, key),
        )
        row = await cur.fetchone()
        return _run(row) if row else None

    async def active_runs(self, conn: AsyncConnection[Any], thread_id: str) -> list[Run]:
        """The thread's pending and running runs in order, with their workflows' versions."""
        cur = await conn.execute(
            f"SELECT {_RUN_COLUMNS}, w.application_version AS version {_RUN_FROM}"
            " LEFT JOIN dbos.workflow_status w ON w.workflow_uuid = r.run_id"
            " WHERE r.thread_id = %s AND r.status IN ('pending', 'running') ORDER BY r.seq",
            (thread_id,),
        )
        return [_run(row) for row in await cur.fetchall()]

    async def latest_run(self, thread_id: str, *, reader: str | None = None) -> Run | None:
        runs = await self.list_runs(thread_id, limit=1, reader=reader)
        return runs[0] if runs else None

    async def list_runs(
        self,
        thread_id: str,
        *,
        limit: int = 50,
        before_seq: int | None = None,
        reader: str | None = None,
    ) -> list[Run]:
        """The thread's runs, newest first, if `reader` (None: anyone) may see the thread: the
        owner check and the read are one statement (no window while a thread is created)."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_RUN_COLUMNS} {_RUN_FROM}"
                " WHERE r.thread_id = %s AND (%s::bigint IS NULL OR r.seq < %s)"
                f" {_READER} ORDER BY r.seq DESC LIMIT %s",
                (thread_id, before_seq, before_seq, reader, reader, limit),
            )
            return [_run(row) for row in await cur.fetchall()]

    async def thread_owner(
        self, thread_id: str, *, conn: AsyncConnection[Any] | None = None
    ) -> str | None:
        """The principal that created the thread ('' with auth off), None if there is none."""
        query = "SELECT owner FROM threadgate.threads WHERE thread_id = %s"
        if conn is not None:
            cur = await conn.execute(query, (thread_id,))
            row = await cur.fetchone()
        else:
            async with self.db.pool.connection() as c:
                cur = await c.execute(query, (thread_id,))
                row = await cur.fetchone()
        return row["owner"] if row else None

    async def thread_exists(self, thread_id: str) -> bool:
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM threadgate.threads WHERE thread_id = %s", (thread_id,)
            )
            return await cur.fetchone() is not None

    async def messages(self, thread_id: str, *, reader: str | None = None) -> list[Message]:
        """The conversation in run order, each run's user message then its reply, if `reader`
        (None: anyone) may see the thread."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                f"""SELECT m.run_id, m.role, m.content, m.escaped, m.layout, m.status,
                          m.created_at, m.parts
                   FROM threadgate.messages m JOIN threadgate.runs r ON r.run_id = m.run_id
                   WHERE m.thread_id = %s {_READER}
                     AND (m.role = 'user' OR r.status = ANY(%s))
                   ORDER BY r.seq, CASE m.role WHEN 'user' THEN 0 ELSE 1 END""",
                (thread_id, reader, reader, list(TERMINAL)),
            )
            return [_message(row) for row in await cur.fetchall()]

    async def history(self, thread_id: str, before_seq: int) -> list[Message]:
        """Messages of the runs accepted before `before_seq` that got a reply: a model prompt."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT m.run_id, m.role, m.content, m.escaped, m.layout, m.status,
                          m.created_at, m.parts
                   FROM threadgate.messages m JOIN threadgate.runs r ON r.run_id = m.run_id
                   WHERE m.thread_id = %s AND r.seq < %s AND r.status = 'success'
                   ORDER BY r.seq, CASE m.role WHEN 'user' THEN 0 ELSE 1 END""",
                (thread_id, before_seq),
            )
            return [_message(row) for row in await cur.fetchall()]

    async def begin_attempt(
        self, run_id: str, executor: str, *, kind: str, timeout_s: float, begin: str
    ) -> Run | None:
        """Count an execution of the reply step. Survives crashes: never repeats a number.

        `kind`: first (of this execution) or retry (after a transient failure in it). A first
        begin of a run that already had attempts is a replay; unless the previous pod handed
        it off (a drain that ran out of time), it counts towards `replays`. `remaining_s` of
        the run's time budget (from its first start, crashes included) is the database's.

        `begin` names this begin (a fresh one per attempt the caller means to begin), kept on
        the run (`begun`) with the attempt it made: the same begin sent again — its answer lost to a failover or a broken
        connection after the commit — gets the attempt it made instead of another one (which
        would be counted as a replay of a run nothing replayed).
        """
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                f"""WITH made AS (
                        SELECT * FROM threadgate.runs
                        WHERE run_id = %(run_id)s AND begun = %(begin)s
                    ), counted AS (
                        UPDATE threadgate.runs
                        SET attempt = attempt + 1, executor = %(executor)s,
                            status = CASE WHEN status = 'pending' THEN 'running' ELSE status END,
                            started_at = coalesce(started_at, now()),
                            replays = replays + CASE WHEN %(first)s::boolean AND attempt > 0
                                                     AND NOT handoff THEN 1 ELSE 0 END,
                            handoff = false,
                            begun = %(begin)s,
                            attempts = attempts || (jsonb_build_object(
                                'attempt', attempt + 1, 'executor', %(executor)s::text,
                                'kind', CASE WHEN NOT %(first)s::boolean THEN 'retry'
                                             WHEN attempt = 0 THEN 'first'
                                             ELSE 'replay' END)
                                -- a run's first attempt has nothing to keep: it begins the
                                -- reply (later attempts record it: record_kept)
                                || CASE WHEN attempt = 0 THEN jsonb_build_object('kept', 0)
                                        ELSE jsonb_build_object() END)
                        WHERE run_id = %(run_id)s AND NOT EXISTS (SELECT 1 FROM made)
                        RETURNING *
                    ), r AS (SELECT * FROM counted UNION ALL SELECT * FROM made)
                    SELECT {_RUN_COLUMNS},
                           extract(epoch FROM r.started_at
                               + make_interval(secs => least(coalesce(r.timeout_s, %(timeout)s),
                                                             %(timeout)s))
                               - now())::float8 AS remaining_s
                    FROM r {_REPLY_JOINS}""",
                {
                    "executor": executor,
                    "first": kind == "first",
                    "run_id": run_id,
                    "timeout": timeout_s,
                    "begin": begin,
                },
            )
            row = await cur.fetchone()
            return _run(row) if row else None

    async def record_kept(self, run_id: str, attempt: int, kept: int) -> None:
        """Note, before the attempt publishes anything, how many of the reply's parts it keeps
        (0: it regenerates the reply): the lineage that decides, on any pod and after the run
        ended, whether a client's parts are still a prefix of the reply (streams/relay.py).
        `resume_from` is kept beside it for people (an attempt that continued)."""
        async with self.db.pool.connection() as conn:
            await conn.execute(
                """UPDATE threadgate.runs
                   SET attempts = (SELECT coalesce(jsonb_agg(CASE WHEN (a->>'attempt')::int = %s
                                          THEN (a - 'resume_from')
                                               || jsonb_build_object('kept', %s::int)
                                               || CASE WHEN %s::int > 0
                                                  THEN jsonb_build_object('resume_from', %s::int)
                                                  ELSE '{}'::jsonb END
                                          ELSE a END ORDER BY n), '[]'::jsonb)
                                   FROM jsonb_array_elements(attempts) WITH ORDINALITY x(a, n))
                   WHERE run_id = %s""",
                (attempt, kept, kept, kept, run_id),
            )

    async def runs_state(self, run_ids: list[str]) -> dict[str, tuple[str | None, int]]:
        """What a process polls for the runs it executes: {run: (stop requested, newest
        attempt)}, in one query."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT run_id, stop_requested, attempt FROM threadgate.runs"
                " WHERE run_id = ANY(%s)",
                (run_ids,),
            )
            return {r["run_id"]: (r["stop_requested"], r["attempt"]) for r in await cur.fetchall()}

    async def hand_off(self, run_ids: list[str], handed: bool = True) -> None:
        """A draining pod leaves these runs to be replayed, or a suspect waits its turn: a
        crash meanwhile is not theirs (`handed=False`: it is again).

        DBOS counts every dispatch of a workflow (`recovery_attempts`) and dead-letters it past
        its bound: a hand-off takes its dispatch off that count, so that DBOS's bound (a
        backstop for pods that die before a run begins an attempt, app/workflows/thread_run.py)
        counts crashes only, as threadgate's own `replays` do (dbos==3.4.0's column)."""
        step = -1 if handed else 1
        async with self.db.pool.connection() as conn:
            await conn.execute(
                """WITH r AS (
                       UPDATE threadgate.runs SET handoff = %s
                       WHERE run_id = ANY(%s) AND handoff <> %s RETURNING run_id)
                   UPDATE dbos.workflow_status w
                   SET recovery_attempts = greatest(coalesce(w.recovery_attempts, 0) + %s, 0)
                   FROM r WHERE w.workflow_uuid = r.run_id""",
                (handed, run_ids, handed, step),
            )

    async def store_reply(
        self, run_id: str, thread_id: str, attempt: int, parts: list[StoredPart], status: str
    ) -> bool:
        """Store the reply an attempt ends with (again if a re-run of the step ends it anew),
        unless a newer attempt has begun since (a fenced process stores nothing). One
        statement. Whether it was stored."""
        text, layout = pack(parts)
        content, escaped = storable(text)
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                """INSERT INTO threadgate.messages
                       (run_id, role, thread_id, content, escaped, layout, status)
                   SELECT %s, 'assistant', %s, %s, %s, %s, %s
                   FROM threadgate.runs WHERE run_id = %s AND attempt = %s
                   ON CONFLICT (run_id, role) DO UPDATE
                   SET content = excluded.content, escaped = excluded.escaped,
                       layout = excluded.layout, status = excluded.status, parts = NULL""",
                (run_id, thread_id, content, escaped, layout, status, run_id, attempt),
            )
            return cur.rowcount == 1

    async def stored_reply(self, run_id: str) -> list[StoredPart] | None:
        """An ended run's reply by parts (None: no reply was stored)."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                """SELECT content, escaped, layout, parts FROM threadgate.messages
                   WHERE run_id = %s AND role = 'assistant'""",
                (run_id,),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        content = restore(row["content"], row["escaped"])
        if row["layout"] is None and row["parts"]:  # stored before layouts, with data parts
            return [
                p["text"] if p["type"] == "text" else (str(p["name"]), p.get("payload"))
                for p in row["parts"]
            ]
        return unpack(content, row["layout"])

    async def finish(
        self,
        run_id: str,
        status: RunStatus,
        *,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """The run's final status (its reply, if any, is stored already), in one statement that
        also says whether a run of the thread waits behind it (pending): the thread's next run
        to claim as the workflow ends."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                """UPDATE threadgate.runs r SET status = %s, error = %s,
                       finished_at = coalesce(r.finished_at, now())
                   WHERE r.run_id = %s
                   RETURNING EXISTS (
                       SELECT 1 FROM threadgate.runs n
                       WHERE n.thread_id = r.thread_id AND n.seq > r.seq
                         AND n.status = 'pending') AS waits""",
                (status, Jsonb(error) if error is not None else None, run_id),
            )
            row = await cur.fetchone()
            return bool(row and row["waits"])

    async def end_abandoned(
        self, run_id: str, executor: str, status: RunStatus, error: dict[str, Any] | None
    ) -> int | None:
        """Finish a run row whose workflow DBOS ended without us (an operator's cancel, a failed
        workflow), in one statement: its final status and, while no later run of its thread
        has begun, one more attempt that keeps nothing — to announce with `done`, so that its
        clients drop the parts no stored reply has. That attempt, None when there is none to
        announce (a later run began: nothing may publish for this one now)."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                """WITH later AS (
                       SELECT EXISTS (
                           SELECT 1 FROM threadgate.runs me JOIN threadgate.runs l
                             ON l.thread_id = me.thread_id AND l.seq > me.seq
                           WHERE me.run_id = %(run)s AND l.attempt > 0) AS begun)
                   UPDATE threadgate.runs r
                   SET status = %(status)s, error = %(error)s,
                       finished_at = coalesce(r.finished_at, now()),
                       attempt = r.attempt + CASE WHEN later.begun THEN 0 ELSE 1 END,
                       attempts = r.attempts || CASE WHEN later.begun THEN '[]'::jsonb
                           ELSE jsonb_build_array(jsonb_build_object(
                               'attempt', r.attempt + 1, 'executor', %(me)s::text,
                               'kind', 'ended', 'kept', 0)) END
                   FROM later
                   WHERE r.run_id = %(run)s AND r.status IN ('pending', 'running')
                   RETURNING r.attempt, later.begun""",
                {
                    "run": run_id,
                    "status": status,
                    "error": Jsonb(error) if error is not None else None,
                    "me": executor,
                },
            )
            row = await cur.fetchone()
        return None if row is None or row["begun"] else int(row["attempt"])

    async def request_stop(
        self, run_id: str, reason: str, *, conn: AsyncConnection[Any] | None = None
    ) -> Run | None:
        """Mark a run to stop (cancelled or interrupted); the workflow honours it.

        A run that has not started ends here and now (its workflow, when dequeued, sees the
        flag and only says `done`); a running one stops within a chunk. None: already ended.
        """
        if conn is None:
            async with self.db.pool.connection() as c:
                return await self.request_stop(run_id, reason, conn=c)
        cur = await conn.execute(
            f"""WITH r AS (
                    UPDATE threadgate.runs
                    SET stop_requested = coalesce(stop_requested, %s),
                        status = CASE WHEN attempt = 0 THEN %s ELSE status END,
                        finished_at = CASE WHEN attempt = 0 THEN now() ELSE finished_at END
                    WHERE run_id = %s AND status IN ('pending', 'running')
                    RETURNING *)
                SELECT {_RUN_COLUMNS} FROM r {_REPLY_JOINS}""",
            (reason, reason, run_id),
        )
        row = await cur.fetchone()
        return _run(row) if row else None

    async def pending_without_workflow(self, older_than_s: float) -> list[Run]:
        """Accepted runs whose enqueue never happened (the accepting pod died in between)."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                f"""SELECT {_RUN_COLUMNS} {_RUN_FROM}
                    WHERE r.status = 'pending'
                      AND r.created_at < now() - make_interval(secs => %s)
                      AND NOT EXISTS (SELECT 1 FROM dbos.workflow_status w
                                      WHERE w.workflow_uuid = r.run_id)""",
                (older_than_s,),
            )
            return [_run(row) for row in await cur.fetchall()]
