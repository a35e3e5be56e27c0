"""A cluster of real pods: every pod serves every thread, whoever runs it."""

from __future__ import annotations

import asyncio

import pytest

from app.models.mock import mock_reply
from tests.conftest import unique
from tests.multipod.cluster import Attacher, Cluster, wait_run

pytestmark = pytest.mark.multipod


async def test_a_run_posted_to_one_pod_streams_identically_from_every_pod(cluster: Cluster) -> None:
    assert len(cluster.pods) == 3 and all(p.alive for p in cluster.pods)
    thread = unique()
    async with cluster.client(cluster.pods[:1]) as client:
        accepted = await client.post(thread, "hello", model_options={"chunks": 12, "delay_ms": 20})
        live = [Attacher([p.url], thread).start() for p in cluster.pods[1:]]
        replies = await asyncio.gather(*(a.result() for a in live))
        run = await wait_run(client, thread, accepted["run_id"])
    assert run["status"] == "success" and run["attempt"] == 1
    assert run["executor"] in {p.name for p in cluster.pods}
    for reply in replies:
        assert reply.run_id == accepted["run_id"]
        assert reply.text == mock_reply(12)
        assert reply.resets == 0 and reply.status == "success"
    streams = [[(e.id, e.event, e.data) for e in a.events] for a in live]
    assert streams[0] == streams[1]
    assert [e for _, e, _ in streams[0]] == ["run_started"] + ["chunk"] * 12 + ["done"]
    # A late attacher on each pod gets the same events again, ids included.
    late = await asyncio.gather(*(Attacher([p.url], thread).start().result() for p in cluster.pods))
    for reply in late:
        assert [(e.id, e.event, e.data) for e in reply.events] == streams[0]
