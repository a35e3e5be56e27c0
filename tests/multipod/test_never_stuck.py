"""Fault sequences the first suites never tried: every accepted run ends, no thread sticks."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unique
from tests.multipod.cluster import (
    FAULT_EXIT,
    TERMINAL,
    Attacher,
    Cluster,
    Pod,
    running_on,
    wait_run,
)
from tests.multipod.conftest import StartCluster

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


async def poison_cluster(start_cluster: StartCluster, poison: str, size: int) -> Cluster:
    """Pods on which every attempt of a run on thread `poison` dies at its third part, and a
    run ends after two replays."""
    return await start_cluster(
        size=size,
        fault_point="attempt_chunk:2",
        fault_thread=poison,
        max_replays=2,
        mock_delay_ms=20,
    )


@pytest.mark.long
async def test_a_poison_run_ends_instead_of_crashing_the_fleet(
    start_cluster: StartCluster,
) -> None:
    """Every attempt of one run kills the pod that runs it (a fault point on its thread, on
    every pod; each pod restarted when it dies). It used to crash-loop the fleet (101 crashes
    in 3 minutes, the run `running` for good). Now: after THREADGATE_MAX_REPLAYS replays the run
    ends `error/crashed_repeatedly` with `done`, without calling the model again, and the
    thread takes new runs."""
    poison, bystander = unique("poison"), unique()
    cluster = await poison_cluster(start_cluster, poison, size=3)
    async with cluster.supervised() as sup, cluster.client() as client:
        ok = await client.post(bystander, "fine", model_options={"chunks": 150, "vary": True})
        bad = await client.post(poison, "poison", model_options={"chunks": 40, "vary": True})
        watcher = Attacher(cluster.urls, poison, reconnects=100).start()
        run = await wait_run(client, poison, bad["run_id"], timeout=120)
        reply = await watcher.result(60)
        assert run["status"] == "error" and run["error"]["code"] == "crashed_repeatedly"
        assert reply.status == "error" and reply.error == run["error"]
        # first attempt + 2 replays died; the third replay ended it without the model
        assert [n for n, code in sup.exits if code == FAULT_EXIT].__len__() == 3
        # The parts its clients saw are its stored reply (none: what a client held is dropped).
        assert run["attempt"] == 4 and (run["output"] or "") == reply.text
        fine = await wait_run(client, bystander, ok["run_id"], timeout=120)
        assert fine["status"] == "success"
        assert fine["output"] == mock_reply(150, continued_from(fine))
        # The thread is free: `reject` does not answer thread_busy.
        after = await client.post(poison, "next", strategy="reject", model_options={"chunks": 1})
        assert (await wait_run(client, poison, after["run_id"]))["status"] == "success"


@pytest.mark.long
async def test_a_run_beside_a_poison_run_survives_it(start_cluster: StartCluster) -> None:
    """One pod, so every crash of the poison run kills the bystander's attempt too (CI saw it
    1 time in 3 on three pods: the bystander ended `crashed_repeatedly` beside the poison).
    From its second replay a run replays alone: the poison dies alone, the bystander ends
    `success` with its exact reply, each replay continuing where the last one stopped."""
    poison, bystander = unique("poison"), unique()
    cluster = await poison_cluster(start_cluster, poison, size=1)
    async with cluster.supervised() as sup, cluster.client() as client:
        ok = await client.post(bystander, "fine", model_options={"chunks": 150, "vary": True})
        await wait_run(client, bystander, ok["run_id"], lambda r: r["status"] == "running")
        bad = await client.post(poison, "poison", model_options={"chunks": 40})
        watcher = Attacher(cluster.urls, bystander, reconnects=100).start()
        run = await wait_run(client, poison, bad["run_id"], timeout=120)
        assert run["status"] == "error" and run["error"]["code"] == "crashed_repeatedly"
        fine = await wait_run(client, bystander, ok["run_id"], timeout=120)
        assert fine["status"] == "success", fine
        assert fine["output"] == mock_reply(150, continued_from(fine))
        assert (await watcher.result(60)).text == fine["output"]
        assert [code for _, code in sup.exits] == [FAULT_EXIT] * 3


def continued_from(run: dict[str, Any]) -> dict[int, int]:
    starts = {0: 1}
    for a in run["attempts"][1:]:
        starts[a.get("resume_from") or 0] = a["attempt"]
    return starts


@pytest.mark.long
async def test_a_run_dbos_dead_letters_is_finished_with_done(start_cluster: StartCluster) -> None:
    """A run whose pod dies before it even begins an attempt, every time: DBOS dead-letters
    its workflow (MAX_RECOVERY_ATTEMPTS_EXCEEDED). Its row used to stay `running` (no `done`,
    `reject` answered thread_busy for ever); the reconciler finishes it."""
    poison = unique("poison")
    cluster = await start_cluster(
        size=2,
        fault_point="before_begin",
        fault_thread=poison,
        max_replays=1,
        adopt_check_s=0.5,
        heartbeat_s=0.5,
    )
    async with cluster.supervised() as sup, cluster.client() as client:
        bad = await client.post(poison, "poison", model_options={"chunks": 3})
        watcher = Attacher(cluster.urls, poison, reconnects=100).start()
        run = await wait_run(client, poison, bad["run_id"], timeout=120)
        assert run["status"] == "error" and run["error"]["code"] == "crashed_repeatedly"
        # No attempt ever began; the reconciler's ending is the one attempt recorded.
        assert [(a["kind"], a["kept"]) for a in run["attempts"]] == [("ended", 0)]
        reply = await watcher.result(30)
        assert reply.status == "error" and reply.text == ""
        # DBOS's bound (max_recovery_attempts = max_replays + 1, one crash past threadgate's
        # own) allows max_replays + 2 dispatches: every one died.
        assert len(sup.exits) == 1 + 2
        after = await client.post(poison, "next", strategy="reject", model_options={"chunks": 1})
        assert after["status"] == "pending"


async def test_a_model_that_stalls_before_its_first_chunk_is_cancelled_at_once(
    cluster: Cluster,
) -> None:
    """The stop used to be checked between chunks only: a source stalled on its first chunk
    (here 60 s away) kept a cancel and an interrupt waiting for it. Now the stop cancels the
    wait itself, from any pod (the executing pod hears it on the control subject)."""
    async with cluster.client() as client:
        for how in ("cancel", "interrupt"):
            thread = unique()
            run = await client.post(thread, "slow", model_options={"chunks": 2, "delay_ms": 60_000})
            executor = await running_on(client, cluster, thread, run["run_id"])
            other = cluster.others(executor.name)[0]
            async with cluster.client([other]) as elsewhere:
                if how == "cancel":
                    await elsewhere.cancel(thread, run["run_id"], wait=True)
                else:
                    await elsewhere.post(
                        thread, "now", strategy="interrupt", model_options={"chunks": 1}
                    )
            final = await wait_run(client, thread, run["run_id"], timeout=30)
            assert final["status"] == ("cancelled" if how == "cancel" else "interrupted")
            assert final["attempt"] == 1


async def test_a_database_outage_while_a_run_backs_off_is_waited_out(
    start_cluster: StartCluster, stack: Stack
) -> None:
    """A transient model failure, then PostgreSQL goes away for longer than the pool's wait
    (THREADGATE_DB_POOL_TIMEOUT_S: 2 s here, 30 s by default): the run's next attempt cannot
    begin. The PoolTimeout used to escape the step and end the run `error/internal`; now the
    attempt waits the outage out and continues the reply. Two pods: a client whose attach
    breaks meanwhile is answered 503 (the database is away) and tries the other pod, until
    the outage ends."""
    cluster = await start_cluster(size=2, retry_base_s=2, mock_delay_ms=50, db_pool_timeout_s=2)
    thread = unique()
    async with cluster.client() as client:
        failing = {"chunks": 6, "fail": "transient", "fail_at": 3, "fail_attempts": 1}
        run = await client.post(thread, "a", model_options={**failing, "vary": True})
        pod = await running_on(client, cluster, thread, run["run_id"])
        watcher = Attacher(cluster.urls, thread, reconnects=200).start()
        await wait_logged(pod, "attempt failed, next in")  # it backs off for 2 s
        stack.pg.stop()
        try:
            await wait_logged(pod, "cannot begin an attempt", timeout=60)
        finally:
            stack.pg.start()
        final = await wait_run(client, thread, run["run_id"], timeout=90)
        reply = await watcher.result(30)
    assert final["status"] == "success"
    assert final["output"] == mock_reply(6, {0: 1, 3: 2}) and final["attempt"] == 2
    assert reply.text == final["output"] and reply.resets == 0 and reply.duplicates == 0


async def test_finishing_waits_out_a_nats_outage_longer_than_its_old_budget(
    start_cluster: StartCluster, stack: Stack
) -> None:
    """NATS goes away right after a run's last chunk: its `done` cannot be published.
    finish_run used to give up after 8 tries, ending the workflow ERROR with the row `running`
    and no `done`. Now it retries until NATS is back (the outage lasts 10 failed tries here),
    and the attached client gets its `done`."""
    cluster = await start_cluster(
        size=2, nats_outage_limit_s=1, publish_timeout_s=1, mock_delay_ms=50, retry_cap_s=0.5
    )
    thread = unique()
    async with cluster.client() as client:
        run = await client.post(thread, "b", model_options={"chunks": 20, "vary": True})
        executor = await running_on(client, cluster, thread, run["run_id"])
        watcher = Attacher([cluster.others(executor.name)[0].url], thread).start()
        await watcher.wait_chunk(19)
        stack.nats.stop()
        try:
            # The outage itself: longer than the old budget of 8 tries.
            await wait_logged(executor, "publishing done failed, retrying", times=10, timeout=90)
        finally:
            stack.nats.start()
        final = await wait_run(client, thread, run["run_id"], timeout=60)
        reply = await watcher.result(60)
    assert final["status"] == "success" and final["attempt"] == 1
    assert reply.status == "success" and reply.text == final["output"] == mock_reply(20, {0: 1})


async def wait_logged(pod: Pod, text: str, timeout: float = 30, times: int = 1) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pod.log_text().count(text) < times:
        assert loop.time() < deadline, f"{pod.name} never logged {text!r} {times} times"
        await asyncio.sleep(0.05)  # paces reading another process's log


@pytest.mark.cluster(size=2, adopt_after_s=2, adopt_check_s=0.3, heartbeat_s=0.3)
async def test_a_database_outage_longer_than_the_adoption_window_adopts_nothing(
    cluster: Cluster, stack: Stack
) -> None:
    """A PostgreSQL restart drops every advisory lock and every heartbeat looks stale: the
    first survivor back could adopt a live pod's runs (two executions of one run). Adoption
    now waits until the adopter itself has heartbeated for a whole window."""
    thread = unique()
    async with cluster.client() as client:
        run = await client.post(thread, "x", model_options={"chunks": 200, "delay_ms": 40})
        executor = await running_on(client, cluster, thread, run["run_id"])
        watcher = Attacher([cluster.others(executor.name)[0].url], thread).start()
        await watcher.wait_chunk(3)
        stack.pg.stop()
        await asyncio.sleep(3.0)  # the outage: longer than adopt_after_s
        stack.pg.start()
        final = await wait_run(client, thread, run["run_id"], timeout=60)
        assert final["status"] == "success" and final["attempt"] == 1
        assert final["executor"] == executor.name
        reply = await watcher.result(30)
        assert reply.text == mock_reply(200) and reply.resets == 0 and reply.duplicates == 0
    assert not any("adopted" in p.log_text() for p in cluster.pods)
