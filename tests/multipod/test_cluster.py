"""A cluster of real pods: every pod serves every thread, whoever runs it."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import Attacher, Cluster, at, wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod


async def test_a_run_posted_to_one_pod_streams_identically_from_every_pod(cluster: Cluster) -> None:
    assert len(cluster.pods) == 3 and all(p.alive for p in cluster.pods)
    thread = unique()
    async with cluster.client(cluster.pods[:1]) as client:
        options = {"chunks": 12, "delay_ms": 20, "vary": True}
        accepted = await client.post(thread, "hello", model_options=options)
        live = [Attacher([p.url], thread).start() for p in cluster.pods[1:]]
        replies = await asyncio.gather(*(a.result() for a in live))
        run = await wait_run(client, thread, accepted["run_id"])
    assert run["status"] == "success" and run["attempt"] == 1
    assert run["executor"] in {p.name for p in cluster.pods}
    for reply in replies:
        assert reply.run_id == accepted["run_id"]
        assert reply.text == run["output"] == mock_reply(12, {0: 1})  # attempt 1's, all of it
        assert reply.resets == 0 and reply.status == "success"
    streams = [[(e.id, e.event, e.data) for e in a.events] for a in live]
    assert streams[0] == streams[1]
    assert [e for _, e, _ in streams[0]] == ["run_started"] + ["chunk"] * 12 + ["done"]
    # A late attacher on each pod gets the same events again, ids included.
    late = await asyncio.gather(*(Attacher([p.url], thread).start().result() for p in cluster.pods))
    for reply in late:
        assert [(e.id, e.event, e.data) for e in reply.events] == streams[0]


async def test_runs_posted_at_once_to_three_pods_take_turns_on_their_thread(
    cluster: Cluster,
) -> None:
    thread = unique()
    clients = [cluster.client([p]) for p in cluster.pods]
    try:
        posted = await asyncio.gather(
            *(
                c.post(thread, f"message {i}", model_options={"chunks": 6 + i, "delay_ms": 20})
                for i, c in enumerate(clients)
            )
        )
    finally:
        for c in clients:
            await c.aclose()
    sent = {p["run_id"]: i for i, p in enumerate(posted)}  # run → which POST (its pod)
    async with cluster.client() as client:
        for p in posted:
            await wait_run(client, thread, p["run_id"])
        runs = list(reversed(await client.runs(thread)))  # newest first → order accepted
        messages = await client.messages(thread)
    assert sorted(r["run_id"] for r in runs) == sorted(sent)
    assert {r["accepted_by"] for r in runs} == {p.name for p in cluster.pods}
    for r in runs:
        assert r["status"] == "success" and r["attempt"] == 1
        assert r["output"] == mock_reply(6 + sent[r["run_id"]])
    for earlier, later in itertools.pairwise(runs):
        assert at(earlier["created_at"]) <= at(later["created_at"])
        # One after another, in the order accepted, never overlapping.
        assert at(earlier["finished_at"]) <= at(later["started_at"])
    expected = []
    for r in runs:
        i = sent[r["run_id"]]
        expected += [
            ("user", r["run_id"], f"message {i}"),
            ("assistant", r["run_id"], mock_reply(6 + i)),
        ]
    assert [(m["role"], m["run_id"], m["content"]) for m in messages] == expected


async def test_runs_keep_turns_when_they_start_at_the_queue_poll_only(
    start_cluster: StartCluster,
) -> None:
    """With event-driven start off (runs start at DBOS's queue poll alone), turns hold too."""
    cluster = await start_cluster(fast_start="false", queue_polling_s=0.05)
    for _ in range(3):
        await test_runs_posted_at_once_to_three_pods_take_turns_on_their_thread(cluster)


async def test_an_idempotent_post_makes_one_run_whichever_pods_it_reaches(
    cluster: Cluster,
) -> None:
    thread = unique()
    body = {"input": "once", "model_options": {"chunks": 4}}
    urls = [f"{p.url}/threads/{thread}/runs" for p in cluster.pods]

    def key(k: str) -> dict[str, str]:
        return {"Idempotency-Key": k}

    async with httpx.AsyncClient(timeout=30) as http:
        first = await http.post(urls[0], json=body, headers=key("k1"))
        again = await http.post(urls[1], json=body, headers=key("k1"))
        assert (first.status_code, again.status_code) == (202, 200)
        assert first.json()["run_id"] == again.json()["run_id"]

        # The same request at the same moment on three pods: still one run.
        at_once = await asyncio.gather(*(http.post(u, json=body, headers=key("k2")) for u in urls))
        assert sorted(r.status_code for r in at_once) == [200, 200, 202]
        assert len({r.json()["run_id"] for r in at_once}) == 1
        assert at_once[0].json()["run_id"] != first.json()["run_id"]

        mismatch = await http.post(urls[2], json={**body, "input": "other"}, headers=key("k1"))
        assert mismatch.status_code == 409
        assert mismatch.json()["error"]["code"] == "idempotency_mismatch"

    run_ids = [first.json()["run_id"], at_once[0].json()["run_id"]]
    async with cluster.client() as client:
        for run_id in run_ids:
            assert (await wait_run(client, thread, run_id))["status"] == "success"
        assert sorted(r["run_id"] for r in await client.runs(thread)) == sorted(run_ids)
        messages = [(m["role"], m["run_id"]) for m in await client.messages(thread)]
    assert messages == [(role, r) for r in run_ids for role in ("user", "assistant")]


async def test_metrics_on_their_own_port_and_not_on_the_api(start_cluster: StartCluster) -> None:
    """THREADGATE_METRICS_PORT: Prometheus scrapes a port the Service and ingress never expose."""
    from threadgate.devstack import free_port

    port = free_port()
    cluster = await start_cluster(size=1, metrics_port=port)
    pod = cluster.pods[0]
    async with httpx.AsyncClient(timeout=5) as http:
        scraped = await http.get(f"http://127.0.0.1:{port}/metrics")
        assert scraped.status_code == 200
        assert "threadgate_queue_depth" in scraped.text
        assert (await http.get(f"{pod.url}/metrics")).status_code == 404
        # The probes answer there too (a pod of several processes answers for the pod there,
        # docs/deploy.md "Process layout"); the API does not.
        assert (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        assert (await http.get(f"http://127.0.0.1:{port}/threads/x/runs")).status_code == 404
    assert await pod.term(30) == 0  # the second server does not hold the pod's shutdown
