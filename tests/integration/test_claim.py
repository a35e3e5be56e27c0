"""Our claim against DBOS's own, on the same tables: the copied predicate must not drift.

Each test uses a queue of its own (registered like the thread queue, with a poll so slow that
DBOS's worker never claims it meanwhile) in the session pod's database, rows written with our
enqueue row (whose columns are checked against DBOS's own enqueue first), and removes them at
its end. DBOS's claim is `SystemDatabase.start_queued_partitioned_workflows`, what its queue
worker runs for this queue; ours is `internals.claim`.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from dbos import DBOS, SetEnqueueOptions, SetWorkflowID
from threadgate.workflows import internals
from threadgate.workflows.thread_run import thread_run

from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration

APP = "threadgate"


@pytest.fixture
async def queue(pod: Pod) -> AsyncIterator[str]:
    name = f"claimtest_{uuid.uuid4().hex[:8]}"
    await DBOS.register_queue_async(name, partition_concurrency=1, polling_interval_sec=3600)
    try:
        yield name
    finally:
        async with pod.runtime.db.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM dbos.workflow_input WHERE workflow_uuid IN"
                " (SELECT workflow_uuid FROM dbos.workflow_status WHERE queue_name = %s)",
                (name,),
            )
            await conn.execute("DELETE FROM dbos.workflow_status WHERE queue_name = %s", (name,))
            await conn.execute("DELETE FROM dbos.queues WHERE name = %s", (name,))


async def enqueue(pod: Pod, queue: str, thread: str, version: str = "v1") -> str:
    wid = f"{thread}.{uuid.uuid4().hex[:8]}"
    row = internals.workflow_row(
        thread_run, (thread, wid), queue=queue, workflow_id=wid, partition=thread, version=version
    )
    async with pod.runtime.db.pool.connection() as conn, conn.transaction():
        await internals.enqueue_in(conn, row)
    return wid


async def ours(pod: Pod, queue: str, executor: str, version: str = "v1", **kw: Any) -> list[str]:
    async with pod.runtime.db.pool.connection() as conn:
        got = await internals.claim(
            conn,
            queue=queue,
            executor=executor,
            version=version,
            app=APP,
            owner_xid=str(uuid.uuid4()),
            **kw,
        )
    return [c.run_id for c in got]


def dbos_claim(queue: str, executor: str, version: str = "v1") -> list[str]:
    sys_db = internals.dbos_instance()._sys_db
    q = sys_db.get_queue(queue)
    ids: list[str] = sys_db.start_queued_partitioned_workflows(
        q, executor, version, owner_xid=str(uuid.uuid4())
    )
    return ids


async def rows(pod: Pod, queue: str) -> dict[str, dict[str, Any]]:
    async with pod.runtime.db.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT * FROM dbos.workflow_status WHERE queue_name = %s", (queue,)
        )
        return {r["workflow_uuid"]: r for r in await cur.fetchall()}


async def finish(pod: Pod, ids: list[str]) -> None:
    async with pod.runtime.db.pool.connection() as conn:
        await conn.execute(
            "UPDATE dbos.workflow_status SET status = 'SUCCESS', owner_xid = NULL"
            " WHERE workflow_uuid = ANY(%s)",
            (ids,),
        )


async def test_our_enqueue_row_is_dboss(pod: Pod, queue: str) -> None:
    """Every column but the id, the clock and the creator token, and the inputs, as DBOS's
    own enqueue writes them for the same call."""
    args = ("t-enq", "r-enq")
    with SetWorkflowID("dbos-" + uuid.uuid4().hex), SetEnqueueOptions(queue_partition_key="t"):
        handle = await DBOS.enqueue_workflow_async(queue, thread_run, *args)
    wid = "ours-" + uuid.uuid4().hex
    row = internals.workflow_row(
        thread_run, args, queue=queue, workflow_id=wid, partition="t", version=None
    )
    async with pod.runtime.db.pool.connection() as conn, conn.transaction():
        await internals.enqueue_in(conn, row)
    got = await rows(pod, queue)
    theirs, mine = dict(got[handle.workflow_id]), dict(got[wid])
    for r in (theirs, mine):
        for k in ("workflow_uuid", "created_at", "updated_at", "creator_xid"):
            r.pop(k)
    assert mine == theirs
    async with pod.runtime.db.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT workflow_uuid, inputs FROM dbos.workflow_input WHERE workflow_uuid = ANY(%s)",
            ([handle.workflow_id, wid],),
        )
        inputs = {r["workflow_uuid"]: r["inputs"] for r in await cur.fetchall()}
    assert inputs[wid] == inputs[handle.workflow_id]


async def scenario(pod: Pod, queue: str) -> dict[str, list[str]]:
    """Partitions in several states; returns each partition's workflows in enqueue order."""
    made: dict[str, list[str]] = {}
    for p, versions in {
        "a": ["v1", "v1", "v1"],  # a plain queue of three
        "b": ["v2", "v1"],  # its first row is another version's: the head is its second
        "c": ["v2"],  # nothing of this version
        "d": ["v1"],  # one, but PENDING below
        "e": ["v1", "v1"],
    }.items():
        made[p] = [await enqueue(pod, queue, p, v) for v in versions]
    async with pod.runtime.db.pool.connection() as conn:
        await conn.execute(
            "UPDATE dbos.workflow_status SET status = 'PENDING' WHERE workflow_uuid = %s",
            (made["d"][0],),
        )
        # d's next run waits behind the PENDING one.
    made["d"].append(await enqueue(pod, queue, "d"))
    return made


async def test_ours_claims_what_dboss_claims(pod: Pod, queue: str) -> None:
    """The same state, claimed once by each (as the same executor and version): the same
    heads, partition by partition, and the same columns set on them."""
    made = await scenario(pod, queue)
    before = await rows(pod, queue)
    theirs = await asyncio.to_thread(dbos_claim, queue, "exec-x")
    after_theirs = await rows(pod, queue)
    # Put the claimed rows back as they were, then claim with ours.
    async with pod.runtime.db.pool.connection() as conn:
        for wid in theirs:
            b = before[wid]
            await conn.execute(
                "UPDATE dbos.workflow_status SET status = %s, owner_xid = %s, executor_id = %s,"
                " started_at_epoch_ms = %s, recovery_attempts = %s, updated_at = %s"
                " WHERE workflow_uuid = %s",
                (
                    b["status"],
                    b["owner_xid"],
                    b["executor_id"],
                    b["started_at_epoch_ms"],
                    b["recovery_attempts"],
                    b["updated_at"],
                    wid,
                ),
            )
    mine = await ours(pod, queue, "exec-x")
    after_mine = await rows(pod, queue)
    assert mine == theirs == [made["a"][0], made["b"][1], made["e"][0]]
    skip = {"owner_xid", "started_at_epoch_ms", "updated_at"}  # a token and two clocks
    for wid in mine:
        t = {k: v for k, v in after_theirs[wid].items() if k not in skip}
        m = {k: v for k, v in after_mine[wid].items() if k not in skip}
        assert m == t, wid
        assert after_mine[wid]["owner_xid"] and after_mine[wid]["started_at_epoch_ms"]
    assert after_mine[made["a"][0]]["executor_id"] == "exec-x"
    assert after_mine[made["a"][0]]["recovery_attempts"] == 1


async def test_one_pending_per_partition_in_order_whoever_claims(pod: Pod, queue: str) -> None:
    """Our claims (several at once, from several connections) race DBOS's (in threads) over
    partitions of five runs each, round after round, finishing what was claimed between
    rounds (every other round ours claim single threads, as accepts do): no run is claimed twice, a partition never has two PENDING runs, and each
    partition's runs start in the order they were enqueued."""
    threads = [f"p{i}" for i in range(12)]
    made = {t: [await enqueue(pod, queue, t) for _ in range(5)] for t in threads}
    claimed: list[str] = []
    loop = asyncio.get_running_loop()
    for n in range(40):
        # Every other round DBOS's claimers go first (ours wait until one of them is in its
        # call): an async claim on the loop would otherwise win every race.
        going = asyncio.Event()

        def theirs(k: int, going: asyncio.Event = going) -> list[str]:
            loop.call_soon_threadsafe(going.set)
            return dbos_claim(queue, f"dbos-{k}")

        async def mine(k: int, n: int = n, going: asyncio.Event = going) -> list[str]:
            if not n % 2:  # all partitions, as at start-up
                return await ours(pod, queue, f"ours-{k}")
            # One thread's partition, as an accept or a run's end does, somewhere inside
            # DBOS's claim (four statements): a jitter spreads the race over all of it.
            await going.wait()
            await asyncio.sleep(random.uniform(0, 0.006))
            return await ours(pod, queue, f"ours-{k}", partition=random.choice(threads))

        got = await asyncio.gather(
            *(mine(k) for k in range(3)),
            *(asyncio.to_thread(theirs, k) for k in range(2)),
        )
        now = [wid for ids in got for wid in ids]
        assert len(now) == len(set(now)), "a run was claimed twice in one round"
        state = await rows(pod, queue)
        pending: dict[str, int] = {}
        for r in state.values():
            if r["status"] == "PENDING":
                pending[r["queue_partition_key"]] = pending.get(r["queue_partition_key"], 0) + 1
        assert all(n == 1 for n in pending.values()), pending
        claimed += now
        await finish(pod, now)
        if len(claimed) == 5 * len(threads):
            break
    assert sorted(claimed) == sorted(w for ws in made.values() for w in ws)
    for t in threads:
        assert [w for w in claimed if w.startswith(f"{t}.")] == made[t]
    kinds = {r["executor_id"].split("-")[0] for r in (await rows(pod, queue)).values()}
    assert kinds == {"ours", "dbos"}, "both claimers took part"


async def test_a_claimed_run_is_recovered_by_its_executor_id(pod: Pod, queue: str) -> None:
    """What DBOS's launch does for an executor (its PENDING runs of its version, re-enqueued)
    finds the runs our claim took under that executor, and puts them back on their queue."""
    executor = f"exec-{uuid.uuid4().hex[:6]}"
    wid = await enqueue(pod, queue, "r")
    assert await ours(pod, queue, executor) == [wid]
    sys_db = internals.dbos_instance()._sys_db
    pending = await asyncio.to_thread(sys_db.get_pending_workflows, executor, "v1")
    assert [p.workflow_id for p in pending] == [wid]
    assert internals.reenqueue(wid, executor)
    row = (await rows(pod, queue))[wid]
    assert row["status"] == "ENQUEUED" and row["queue_name"] == queue
    assert await ours(pod, queue, "exec-next") == [wid]


async def test_the_claim_says_what_the_first_steps_would_read(pod: Pod, queue: str) -> None:
    """Whether a step output exists (DBOS's step checks), whether runs wait behind (the end
    of the run claims the next), and the run row's attempt and replays (the suspect check)."""
    first = await enqueue(pod, queue, "s")
    second = await enqueue(pod, queue, "s")
    again = await enqueue(pod, queue, "u")
    async with pod.runtime.db.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO dbos.operation_outputs (workflow_uuid, function_id, function_name,"
            " output) VALUES (%s, 1, 'stream_reply', 'x')",
            (again,),
        )
        await conn.execute(
            "INSERT INTO threadgate.threads (thread_id) VALUES ('u') ON CONFLICT DO NOTHING"
        )
        await conn.execute(
            "INSERT INTO threadgate.runs (run_id, thread_id, accepted_by, input, attempt,"
            " replays) VALUES (%s, 'u', 'x', 'x', 2, 1)",
            (again,),
        )
    try:
        async with pod.runtime.db.pool.connection() as conn:
            got = await internals.claim(
                conn,
                queue=queue,
                executor="exec-s",
                version="v1",
                app=APP,
                owner_xid="o",
            )
        by = {c.run_id: c for c in got}
        assert set(by) == {first, again}
        assert not by[first].steps_recorded and by[first].behind and by[first].attempt == 0
        assert by[again].steps_recorded and not by[again].behind
        assert (by[again].attempt, by[again].replays) == (2, 1)
        assert by[first].status["inputs"] and by[first].status["status"] == "PENDING"
        assert second not in by
    finally:
        async with pod.runtime.db.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM dbos.operation_outputs WHERE workflow_uuid = %s", (again,)
            )
            await conn.execute("DELETE FROM threadgate.runs WHERE run_id = %s", (again,))


async def test_a_thread_claim_takes_only_its_partition(pod: Pod, queue: str) -> None:
    x = await enqueue(pod, queue, "x")
    await enqueue(pod, queue, "y")
    assert await ours(pod, queue, "exec-t", partition="x") == [x]
    assert await ours(pod, queue, "exec-t", partition="x") == []  # x is PENDING now
    assert await ours(pod, queue, "exec-t", partition="nothing-here") == []
