"""The process dies at each phase of a run (os._exit at a fault point); its restart finishes it.

A one-pod cluster, so the faulty process is the one that dequeues the run; the restart (same
name, no fault point) recovers the run through DBOS launch-time recovery. Replies use the
mock's `vary` text: the stored reply says which attempt wrote each chunk, so a continued
reply (attempt 1's chunks, then attempt 2's) and a regenerated one (attempt 2's alone) differ.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import FAULT_EXIT, Attacher, wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod

CHUNKS = 10
# Where the reply step is re-run (a new attempt) and where only `finish_run` is, with what the
# new attempt keeps of the first one (the parts stored before the process died).
IN_STREAM_STEP = {
    "before_purge": 0,
    "after_start": 0,
    "chunk:0": 1,
    "chunk:5": 6,
    "chunk:9": 10,  # the last chunk
    "after_chunks": 10,  # every chunk, but not the step's end
}
IN_FINISH_STEP = {"after_store": CHUNKS, "after_done": CHUNKS}


@pytest.mark.parametrize("point", [*IN_STREAM_STEP, *IN_FINISH_STEP])
async def test_a_run_killed_at_any_point_completes_exactly_once(
    start_cluster: StartCluster, point: str
) -> None:
    cluster = await start_cluster(size=1, fault_point=point)
    pod = cluster.pods[0]
    thread = unique()
    async with cluster.client() as client:
        options = {"chunks": CHUNKS, "delay_ms": 10, "vary": True}
        run_id = (await client.post(thread, "hi", model_options=options))["run_id"]
        # Attached from the start: its connection breaks with the process, and it resumes
        # (Last-Event-ID) on the restarted pod.
        live = Attacher([pod.url], thread, reconnects=30).start()
        assert await pod.wait_exit(30) == FAULT_EXIT
        assert f"fault point {point} reached" in pod.log_text()

        await pod.restart({"THREADGATE_FAULT_POINT": ""})
        run = await wait_run(client, thread, run_id)
        assert run["status"] == "success"
        kept = {**IN_STREAM_STEP, **IN_FINISH_STEP}[point]
        if point in IN_STREAM_STEP:
            assert run["attempt"] == 2
            # Kept parts are continued after (no `reset`); with none kept it regenerates.
            assert run["attempts"][1].get("resume_from") == (kept or None)
            stored = mock_reply(CHUNKS, {0: 1, kept: 2} if kept else {0: 2})
        else:
            assert run["attempt"] == 1
            stored = mock_reply(CHUNKS, {0: 1})
        assert run["output"] == stored

        reply = await live.result()
        assert reply.text == stored and reply.status == "success"
        assert reply.duplicates == 0 and reply.resets == 0

        late = await Attacher([pod.url], thread).start().result()
        assert late.resets == 0 and late.status == "success" and late.duplicates == 0
        assert late.text == stored
        chunks = [e.data["index"] for e in late.events if e.event == "chunk"]
        assert chunks == list(range(CHUNKS))
        starts = [e.data for e in late.events if e.event == "run_started"]
        if kept > 0 and point in IN_STREAM_STEP:
            assert [(s["attempt"], s.get("resume_from")) for s in starts] == [(1, None), (2, kept)]
        else:
            assert len(starts) == 1

        # The workflow itself ends (the thread's partition slot is free): a next run goes through.
        await wait_workflow(cluster.env["THREADGATE_DATABASE_URL"], run_id, "SUCCESS")
        after = (await client.post(thread, "again", model_options={"chunks": 3}))["run_id"]
        assert (await wait_run(client, thread, after))["status"] == "success"
        messages = [(m["role"], m["run_id"], m["content"]) for m in await client.messages(thread)]
        assert messages == [
            ("user", run_id, "hi"),
            ("assistant", run_id, stored),
            ("user", after, "again"),
            ("assistant", after, mock_reply(3)),
        ]


async def wait_workflow(database_url: str, run_id: str, status: str, timeout: float = 20) -> None:
    """Poll DBOS's own record of the workflow until it reaches `status`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT status FROM dbos.workflow_status WHERE workflow_uuid = %s", (run_id,)
            )
            row = await cur.fetchone()
            if row and row[0] == status:
                return
            assert loop.time() < deadline, f"workflow {run_id} is {row}, not {status}"
            await asyncio.sleep(0.05)  # paces polling a row another process writes
