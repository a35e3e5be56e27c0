"""Fault sequences the first suites never tried: every accepted run ends, no thread sticks."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import unique
from tests.multipod.cluster import TERMINAL, Cluster, wait_run

pytestmark = pytest.mark.multipod

SLOW = {"chunks": 400, "delay_ms": 20}


async def post(http: httpx.AsyncClient, url: str, thread: str, **body: object) -> httpx.Response:
    return await http.post(f"{url}/threads/{thread}/runs", json={"input": "x", **body})


@pytest.mark.cluster(size=1)
async def test_a_burst_of_interrupts_on_one_thread_is_answered(cluster: Cluster) -> None:
    """Twelve `interrupt` POSTs at once to one thread used to wedge the pod: each waiting POST
    held a pool connection on the thread's advisory lock while the holder needed one more."""
    pod = cluster.pods[0]
    thread, other = unique(), unique()
    async with httpx.AsyncClient(timeout=20) as http:
        first = await post(http, pod.url, thread, model_options=SLOW)
        assert first.status_code == 202
        burst = [
            post(http, pod.url, thread, multitask_strategy="interrupt", model_options=SLOW)
            for _ in range(12)
        ]
        # Another thread is not slowed: its POST is answered while the burst is in flight.
        answers = await asyncio.gather(*burst, post(http, pod.url, other))
    statuses = [r.status_code for r in answers]
    assert statuses == [202] * 13, [r.text for r in answers]
    runs = [first.json()["run_id"]] + [r.json()["run_id"] for r in answers[:12]]
    async with cluster.client() as client:
        # Each interrupt ended every run accepted before it: one run is left, the last one.
        listed = await client.runs(thread)
        assert sorted(r["run_id"] for r in listed) == sorted(runs)
        active = [r for r in listed if r["status"] not in TERMINAL]
        assert len(active) == 1 and active[0]["run_id"] == listed[0]["run_id"]
        assert {r["status"] for r in listed[1:]} == {"interrupted"}
        await client.cancel(thread, active[0]["run_id"], wait=True)
        assert (await wait_run(client, thread, active[0]["run_id"]))["status"] == "cancelled"


@pytest.mark.cluster(size=1)
async def test_interrupt_is_accepted_when_the_active_run_ends_meanwhile(cluster: Cluster) -> None:
    """The run to interrupt may finish between the accept reading it and the stop: the new run
    was accepted all the same, so the answer is 202, never 409."""
    pod = cluster.pods[0]
    async with httpx.AsyncClient(timeout=20) as http:
        for _ in range(30):
            thread = unique()
            # A run that ends a few ms after it starts: the interrupt races its end.
            first = await post(http, pod.url, thread, model_options={"chunks": 1, "delay_ms": 1})
            assert first.status_code == 202
            await wait_run(
                cluster.client(), thread, first.json()["run_id"], lambda r: r["status"] != "pending"
            )
            second = await post(
                http, pod.url, thread, multitask_strategy="interrupt", model_options={"chunks": 1}
            )
            assert second.status_code == 202, second.text
