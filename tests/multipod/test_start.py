"""Runs start on events: the accepting pod, the pod that ends a thread's run, a kick on the
control subject — and DBOS's slow queue poll as the safety net when an event is lost."""

from __future__ import annotations

import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import Attacher, Cluster, running_on, wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod


@pytest.mark.cluster(queue_polling_s=60)
async def test_a_new_run_starts_on_the_pod_that_accepted_it(cluster: Cluster) -> None:
    """No poll: the accepting pod claims its run at once. (The safety-net poll is 60 s here,
    so that no other pod's poll can take a run in the instant between its accept and its
    claim: that would be correct too, but not what this test names.)"""
    async with cluster.client() as client:
        for pod in cluster.pods * 2:
            thread = unique()
            async with cluster.client([pod]) as on_pod:
                run = await on_pod.post(thread, "hi", model_options={"chunks": 2})
            final = await wait_run(client, thread, run["run_id"])
            assert final["status"] == "success" and final["executor"] == pod.name
            assert final["attempts"] == [
                {"attempt": 1, "executor": pod.name, "kind": "first", "kept": 0}
            ]


@pytest.mark.cluster(queue_polling_s=60)
async def test_a_threads_next_run_starts_when_its_run_ends(cluster: Cluster) -> None:
    thread = unique()
    async with cluster.client() as client:
        first = await client.post(thread, "one", model_options={"chunks": 20, "delay_ms": 20})
        executor = await running_on(client, cluster, thread, first["run_id"])
        # Queued behind it on another pod, which cannot claim it now (the partition is busy).
        async with cluster.client(cluster.others(executor.name)) as elsewhere:
            second = await elsewhere.post(thread, "two", model_options={"chunks": 2})
        a = await wait_run(client, thread, first["run_id"])
        b = await wait_run(client, thread, second["run_id"])
    assert a["status"] == b["status"] == "success"
    assert a["finished_at"] <= b["started_at"]
    # The pod that ended the thread's run claimed its next one itself.
    assert b["executor"] == executor.name


@pytest.mark.parametrize("deaf", [False, True])
async def test_a_draining_pod_hands_the_threads_next_run_over(
    start_cluster: StartCluster, deaf: bool
) -> None:
    """The pod ending a thread's run is draining: it claims nothing and kicks the others on
    the control subject. The queue poll is 60 s away here, so the other pod can start the run
    within the test's 30 s only on that kick. A pod that misses every control message
    (`deaf`: it listens on another subject) still starts the run, at its queue poll (2 s, the
    default). The other pod is down while the first run is accepted and claimed, so no poll of
    its can take that run first: the draining pod must be the one ending it."""
    deaf_pod = {"THREADGATE_CONTROL_SUBJECT": f"deaf.{unique()}"}
    polling = {} if deaf else {"queue_polling_s": 60}
    cluster = await start_cluster(
        size=2, per_pod={1: deaf_pod} if deaf else None, drain_timeout_s=30, **polling
    )
    draining, other = cluster.pods
    await other.kill()
    thread = unique()
    async with cluster.client([draining]) as on_draining, cluster.client([other]) as on_other:
        # Long enough to outlast the other pod's restart: it ends while its pod drains.
        first = await on_draining.post(thread, "one", model_options={"chunks": 150, "delay_ms": 40})
        assert (await running_on(on_draining, cluster, thread, first["run_id"])) is draining
        await other.restart(deaf_pod if deaf else None)
        second = await on_draining.post(thread, "two", model_options={"chunks": 3, "vary": True})
        watcher = Attacher([other.url], thread).start()
        draining.send_term()
        b = await wait_run(on_other, thread, second["run_id"], timeout=30)
        a = await wait_run(on_other, thread, first["run_id"])
        assert await draining.wait_exit(60) == 0
    assert a["status"] == "success" and a["executor"] == draining.name
    assert b["status"] == "success" and b["executor"] == other.name
    assert b["output"] == mock_reply(3, {0: 1})
    reply = await watcher.result(30)
    assert reply.run_id == second["run_id"] and reply.text == b["output"]
