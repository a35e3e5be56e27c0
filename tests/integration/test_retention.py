"""Retention on a database with aged runs: finished runs leave, nothing unfinished is touched.

Runs are made for real (POST, the workflow runs, the reply is stored), then aged by moving
their timestamps 40 days back (the run row's and its DBOS workflow's), as a month of traffic
would leave them. Counted before and after, in every table that holds a run's rows.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from threadgate.retention import Retention

from tests.conftest import unique
from tests.integration.conftest import Pod
from tests.multipod.cluster import wait_run

pytestmark = pytest.mark.integration

AGE_DAYS = 40
DAY_MS = 86_400_000
# Every DBOS 3.4.0 table keyed by a workflow id (dbos/_schemas/system_database.py).
DBOS_TABLES = {
    "workflow_status": "workflow_uuid",
    "workflow_input": "workflow_uuid",
    "workflow_output": "workflow_uuid",
    "operation_outputs": "workflow_uuid",
    "workflow_events": "workflow_uuid",
    "workflow_events_history": "workflow_uuid",
    "streams": "workflow_uuid",
    "notifications": "destination_uuid",
}


async def rows(pod: Pod, ids: list[str]) -> dict[str, int]:
    """Rows of these runs in each table: DBOS's and threadgate's."""
    counts: dict[str, int] = {}
    async with pod.runtime.db.pool.connection() as conn:
        for table, key in DBOS_TABLES.items():
            cur = await conn.execute(
                f"SELECT count(*) AS n FROM dbos.{table} WHERE {key} = ANY(%s)", (ids,)
            )
            counts[table] = (await cur.fetchone())["n"]  # type: ignore[index]
        for table in ("runs", "messages"):
            cur = await conn.execute(
                f"SELECT count(*) AS n FROM threadgate.{table} WHERE run_id = ANY(%s)", (ids,)
            )
            counts[table] = (await cur.fetchone())["n"]  # type: ignore[index]
    return counts


async def workflow_status(pod: Pod, run_id: str) -> str | None:
    async with pod.runtime.db.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", (run_id,)
        )
        row = await cur.fetchone()
    return row["status"] if row else None


async def workflow_ended(pod: Pod, run_id: str, timeout: float = 30.0) -> None:
    """DBOS records the workflow's end a moment after the run's row is final."""
    async with asyncio.timeout(timeout):
        while await workflow_status(pod, run_id) in ("PENDING", "ENQUEUED"):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # paces polling the workflow's status


async def age(pod: Pod, ids: list[str], days: int = AGE_DAYS) -> None:
    async with pod.runtime.db.pool.connection() as conn:
        await conn.execute(
            """UPDATE threadgate.runs SET created_at = created_at - make_interval(days => %s),
                   started_at = started_at - make_interval(days => %s),
                   finished_at = finished_at - make_interval(days => %s)
               WHERE run_id = ANY(%s)""",
            (days, days, days, ids),
        )
        await conn.execute(
            """UPDATE dbos.workflow_status SET created_at = created_at - %s,
                   updated_at = updated_at - %s WHERE workflow_uuid = ANY(%s)""",
            (days * DAY_MS, days * DAY_MS, ids),
        )


def retention(pod: Pod, **settings: Any) -> Retention:
    return Retention(pod.settings.model_copy(update=settings), pod.runtime.db)


async def test_retention_deletes_old_finished_runs_and_nothing_unfinished(pod: Pod) -> None:
    client = pod.client
    done_thread, busy_thread, fresh_thread = unique("old"), unique("busy"), unique("new")

    # Aged and finished: two successes and an error.
    old: list[str] = []
    for text, opts in (("a", {}), ("b", {}), ("c", {"fail": "permanent"})):
        run_id = (await client.post(done_thread, text, model_options={"chunks": 3, **opts}))[
            "run_id"
        ]
        assert (await wait_run(client, done_thread, run_id))["status"] in ("success", "error")
        await workflow_ended(pod, run_id)
        old.append(run_id)
    # Finished, but young.
    fresh = (await client.post(fresh_thread, "young", model_options={"chunks": 3}))["run_id"]
    await wait_run(client, fresh_thread, fresh)
    await workflow_ended(pod, fresh)
    # Unfinished and aged: a long reply streaming now, and a run queued behind it that was
    # cancelled (its row is final at once; its workflow waits in the queue until dequeued).
    running = (
        await client.post(busy_thread, "long", model_options={"chunks": 2000, "delay_ms": 50})
    )["run_id"]
    await wait_run(client, busy_thread, running, lambda r: r["status"] == "running")
    queued = (await client.post(busy_thread, "behind"))["run_id"]
    assert (await client.cancel(busy_thread, queued))["status"] == "cancelled"
    assert await workflow_status(pod, queued) == "ENQUEUED"
    await age(pod, [*old, running, queued])

    unfinished = [running, queued]
    before = {
        "old": await rows(pod, old),
        "fresh": await rows(pod, [fresh]),
        "unfinished": await rows(pod, unfinished),
    }
    print(f"\nbefore: {before}")
    # One step output a run (stream_reply; the finish is code since issue 29).
    assert before["old"]["workflow_status"] == 3 and before["old"]["operation_outputs"] >= 3
    assert before["old"]["runs"] == 3 and before["old"]["messages"] == 5  # no reply on error
    assert before["unfinished"]["workflow_status"] == 2

    # Workflows after 30 days; the conversation is kept (the default).
    swept = await retention(pod, retention_days=30, messages_retention_days=0).sweep()
    assert swept is not None and swept.workflows >= 3 and swept.conversations == 0
    after = {
        "old": await rows(pod, old),
        "fresh": await rows(pod, [fresh]),
        "unfinished": await rows(pod, unfinished),
    }
    print(f"after workflows: {after}")
    assert all(after["old"][t] == 0 for t in DBOS_TABLES), after["old"]
    assert (after["old"]["runs"], after["old"]["messages"]) == (3, 5)
    assert after["fresh"] == before["fresh"]
    assert after["unfinished"] == before["unfinished"]
    # The API still answers for a run whose workflow left: its row and reply remain.
    assert (await client.run(done_thread, old[0]))["output"] is not None
    assert len(await client.messages(done_thread)) == 5

    # The conversation too, after 30 days.
    swept = await retention(pod, retention_days=30, messages_retention_days=30).sweep()
    assert swept is not None and swept.conversations >= 3
    final = {
        "old": await rows(pod, old),
        "fresh": await rows(pod, [fresh]),
        "unfinished": await rows(pod, unfinished),
    }
    print(f"after conversations: {final}")
    assert all(n == 0 for n in final["old"].values()), final["old"]
    assert final["fresh"] == before["fresh"]
    assert final["unfinished"] == before["unfinished"]
    assert await client.messages(done_thread) == []
    # The thread itself stays (its owner): nobody else can take its id over.
    assert await pod.runtime.store.thread_exists(done_thread)

    # The unfinished ones carry on untouched and end as they would have.
    await client.cancel(busy_thread, running)
    assert (await wait_run(client, busy_thread, running))["status"] == "cancelled"
    await workflow_ended(pod, queued)
    assert (await client.run(busy_thread, queued))["status"] == "cancelled"


async def test_one_pod_sweeps_at_a_time(pod: Pod) -> None:
    """The advisory lock: a second sweeper finds it held and does nothing."""
    first = retention(pod, retention_days=30)
    async with pod.runtime.db.pool.connection() as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (0x7467_7274,))
        try:
            assert await first.sweep() is None
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (0x7467_7274,))
    assert await first.sweep() is not None


async def test_retention_off_keeps_everything(pod: Pod) -> None:
    off = retention(pod, retention_days=0, messages_retention_days=0)
    assert not off.enabled
    assert await off.sweep() is None
