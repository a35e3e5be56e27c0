"""The process dies at each phase of a run (os._exit at a fault point); its restart finishes it.

A one-pod cluster, so the faulty process is the one that dequeues the run; the restart (same
name, no fault point) recovers the run through DBOS launch-time recovery.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import FAULT_EXIT, Attacher, final_attempt, wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod

CHUNKS = 10
# Where the reply step is re-run (a new attempt) and where only `finish_run` is.
IN_STREAM_STEP = ["before_purge", "after_start", "chunk:5", "after_chunks"]
IN_FINISH_STEP = ["after_store", "after_done"]


@pytest.mark.parametrize("point", IN_STREAM_STEP + IN_FINISH_STEP)
async def test_a_run_killed_at_any_point_completes_exactly_once(
    start_cluster: StartCluster, point: str
) -> None:
    cluster = await start_cluster(size=1, fault_point=point)
    pod = cluster.pods[0]
    thread = unique()
    async with cluster.client() as client:
        run_id = (
            await client.post(thread, "hi", model_options={"chunks": CHUNKS, "delay_ms": 10})
        )["run_id"]
        # Attached from the start: its connection breaks with the process, and it resumes
        # (Last-Event-ID) on the restarted pod.
        live = Attacher([pod.url], thread, reconnects=30).start()
        assert await pod.wait_exit(30) == FAULT_EXIT
        assert f"fault point {point} reached" in pod.log_text()

        await pod.restart({"THREADGATE_FAULT_POINT": ""})
        run = await wait_run(client, thread, run_id)
        assert run["status"] == "success"
        assert run["attempt"] == (2 if point in IN_STREAM_STEP else 1)
        assert run["output"] == mock_reply(CHUNKS)

        reply = await live.result()
        assert reply.text == mock_reply(CHUNKS) and reply.status == "success"
        final = final_attempt(live.events)
        assert [e.data.get("index") for e in final if e.event == "chunk"] == list(range(CHUNKS))

        late = await Attacher([pod.url], thread).start().result()
        assert late.resets == 0 and late.status == "success"
        assert late.text == mock_reply(CHUNKS)
        assert [e.event for e in late.events] == ["run_started"] + ["chunk"] * CHUNKS + ["done"]
        assert {e.data["attempt"] for e in late.events} == {run["attempt"]}

        # The workflow itself ends (the thread's partition slot is free): a next run goes through.
        await wait_workflow(cluster.env["THREADGATE_DATABASE_URL"], run_id, "SUCCESS")
        after = (await client.post(thread, "again", model_options={"chunks": 3}))["run_id"]
        assert (await wait_run(client, thread, after))["status"] == "success"
        messages = [(m["role"], m["run_id"], m["content"]) for m in await client.messages(thread)]
        assert messages == [
            ("user", run_id, "hi"),
            ("assistant", run_id, mock_reply(CHUNKS)),
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
