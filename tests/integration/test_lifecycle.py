"""Run lifecycle: multitask strategies, cancel, idempotency, errors, timeouts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from threadgate.client import AsyncClient, Reply
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration

SLOW = {"chunks": 200, "delay_ms": 20}


async def wait_status(
    client: AsyncClient, thread: str, run_id: str, *statuses: str, timeout: float = 30
) -> dict[str, Any]:
    """Poll the run until it reaches one of `statuses` (a deadline, not a sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        run = await client.run(thread, run_id)
        if run["status"] in statuses:
            return run
        assert loop.time() < deadline, f"run stuck in {run['status']}"
        await asyncio.sleep(0.02)


async def test_reject_while_busy_then_accept_when_idle(pod: Pod) -> None:
    thread = unique()
    await pod.client.post(thread, "long", model_options=SLOW)
    resp = await pod.http.post(
        f"/threads/{thread}/runs", json={"input": "no", "multitask_strategy": "reject"}
    )
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "thread_busy"
    runs = await pod.client.runs(thread)
    await pod.client.cancel(thread, runs[0]["run_id"], wait=True)
    ok = await pod.client.post(thread, "yes", strategy="reject", model_options={"chunks": 2})
    assert (await pod.client.reply(thread)).run_id == ok["run_id"]


# One chunk every 100 ms: a stop "within a chunk" leaves room for one more chunk at most (the
# one being made when the stop lands) and one whose publish raced the client's count.
PACED = {"chunks": 200, "delay_ms": 100}


@dataclass
class Follower:
    """A client attached in the background; `seen` is set once it holds `after` chunks."""

    reply: Reply = field(default_factory=Reply)
    seen: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def follow(client: AsyncClient, thread: str, after: int = 3) -> Follower:
    f = Follower()

    async def run() -> None:
        async for ev in client.events(thread):
            f.reply.apply(ev)
            if len(f.reply.chunks) >= after:
                f.seen.set()

    f.task = asyncio.create_task(run())
    return f


async def test_interrupt_stops_the_active_run_and_stores_the_partial_reply(pod: Pod) -> None:
    thread = unique()
    first = await pod.client.post(thread, "long", model_options=PACED)
    live = follow(pod.client, thread)
    await asyncio.wait_for(live.seen.wait(), 30)
    held = len(live.reply.chunks)  # what the user saw when they sent the interrupting message
    second = await pod.client.post(thread, "now", strategy="interrupt", model_options={"chunks": 3})
    assert live.task is not None
    await asyncio.wait_for(live.task, 30)  # the interrupted run's `done` ends the attach
    assert live.reply.status == "interrupted" and live.reply.run_id == first["run_id"]
    assert held <= len(live.reply.chunks) <= held + 2
    reply = await pod.client.reply(thread)
    assert reply.run_id == second["run_id"] and reply.text == mock_reply(3)
    old = await pod.client.run(thread, first["run_id"])
    assert old["status"] == "interrupted"
    # The partial reply kept is exactly what was streamed before the stop.
    assert old["output"] == live.reply.text == mock_reply(len(live.reply.chunks))
    messages = await pod.client.messages(thread)
    statuses = [(m["role"], m["status"]) for m in messages]
    assert statuses == [
        ("user", "complete"),
        ("assistant", "interrupted"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]


async def test_cancel_running_run_stops_within_a_chunk(pod: Pod) -> None:
    thread = unique()
    run = await pod.client.post(thread, "long", model_options=PACED)
    live = follow(pod.client, thread)
    await asyncio.wait_for(live.seen.wait(), 30)
    held = len(live.reply.chunks)  # what the client had when it asked to cancel
    cancelled = await pod.client.cancel(thread, run["run_id"], wait=True)
    assert cancelled["status"] == "cancelled"
    assert live.task is not None
    await asyncio.wait_for(live.task, 30)
    assert live.reply.status == "cancelled"
    assert held <= len(live.reply.chunks) <= held + 2
    # The partial reply its clients saw is stored with the run (contract v3).
    assert (await pod.client.run(thread, run["run_id"]))["output"] == live.reply.text
    # cancelled twice: 409; the thread takes its next run at once
    resp = await pod.http.post(f"/threads/{thread}/runs/{run['run_id']}/cancel")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "run_finished"
    nxt = await pod.client.post(thread, "next", model_options={"chunks": 2})
    assert (await pod.client.reply(thread)).run_id == nxt["run_id"]


async def test_cancel_queued_run_never_starts(pod: Pod) -> None:
    thread = unique()
    active = await pod.client.post(thread, "long", model_options={"chunks": 30, "delay_ms": 10})
    queued = await pod.client.post(thread, "queued", model_options={"chunks": 3})
    cancelled = await pod.client.cancel(thread, queued["run_id"])
    assert cancelled["status"] == "cancelled"  # at once: it had not started
    reply = await pod.client.reply(thread)  # the latest run: the cancelled one
    assert reply.run_id == queued["run_id"] and reply.status == "cancelled"
    assert reply.chunks == {}
    await wait_status(pod.client, thread, active["run_id"], "success")
    q = await pod.client.run(thread, queued["run_id"])
    assert q["status"] == "cancelled" and q["output"] is None


async def test_idempotent_post(pod: Pod) -> None:
    thread = unique()
    body = {"input": "once", "model_options": {"chunks": 2}}
    headers = {"Idempotency-Key": "k-1"}
    a = await pod.http.post(f"/threads/{thread}/runs", json=body, headers=headers)
    b = await pod.http.post(f"/threads/{thread}/runs", json=body, headers=headers)
    assert (a.status_code, b.status_code) == (202, 200)
    assert a.json()["run_id"] == b.json()["run_id"]
    c = await pod.http.post(f"/threads/{thread}/runs", json={"input": "other"}, headers=headers)
    assert c.status_code == 409 and c.json()["error"]["code"] == "idempotency_mismatch"
    # keys are per thread
    d = await pod.http.post(f"/threads/{unique()}/runs", json=body, headers=headers)
    assert d.status_code == 202


@pytest.mark.parametrize(
    "change",
    [
        {"input": "other"},
        {"model_options": {"chunks": 3}},
        {"model_options": {"chunks": 2, "delay_ms": 7}},
        {"timeout_s": 60},
        {"multitask_strategy": "reject"},
    ],
    ids=["input", "model_options", "an_added_option", "timeout_s", "strategy"],
)
async def test_a_key_reused_with_any_other_field_is_409(pod: Pod, change: dict[str, Any]) -> None:
    """Same Idempotency-Key, a body that differs in any one field the run is made of: 409
    idempotency_mismatch naming the first run, never that run returned for another request."""
    thread = unique()
    body: dict[str, Any] = {"input": "once", "model_options": {"chunks": 2}}
    headers = {"Idempotency-Key": "k-field"}
    first = await pod.http.post(f"/threads/{thread}/runs", json=body, headers=headers)
    assert first.status_code == 202
    again = await pod.http.post(f"/threads/{thread}/runs", json={**body, **change}, headers=headers)
    assert again.status_code == 409, again.text
    error = again.json()["error"]
    assert error["code"] == "idempotency_mismatch"
    assert first.json()["run_id"] in again.text


async def test_concurrent_duplicate_posts_make_one_run(pod: Pod) -> None:
    thread = unique()
    body = {"input": "race", "model_options": {"chunks": 2}}
    responses = await asyncio.gather(
        *[
            pod.http.post(f"/threads/{thread}/runs", json=body, headers={"Idempotency-Key": "same"})
            for _ in range(8)
        ]
    )
    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    assert len({r.json()["run_id"] for r in responses}) == 1
    assert len(await pod.client.runs(thread)) == 1


async def test_permanent_error_ends_the_run_and_the_thread_goes_on(pod: Pod) -> None:
    thread = unique()
    bad = await pod.client.post(thread, "x", model_options={"fail": "permanent"})
    reply = await pod.client.reply(thread)
    assert reply.status == "error" and reply.error is not None
    assert reply.error["code"] == "model_permanent"
    run = await pod.client.run(thread, bad["run_id"])
    assert run["status"] == "error" and run["attempt"] == 1 and run["output"] is None
    good = await pod.client.post(thread, "y", model_options={"chunks": 2})
    after = await pod.client.reply(thread)
    assert after.run_id == good["run_id"] and after.text == mock_reply(2)
    assert [m["role"] for m in await pod.client.messages(thread)] == ["user", "user", "assistant"]


async def test_transient_errors_retry_as_attempts_that_continue_the_reply(pod: Pod) -> None:
    """Attempts 1 and 2 fail at chunk 3 (after backoff); attempt 3 continues after the three
    chunks attempt 1 stored: no `reset`, each chunk once, the text says who wrote it."""
    thread = unique()
    options = {"chunks": 6, "fail": "transient", "fail_at": 3, "fail_attempts": 2, "vary": True}
    run = await pod.client.post(thread, "x", model_options=options)
    reply = await pod.client.reply(thread)
    stored = mock_reply(6, {0: 1, 3: 3})
    assert reply.text == stored and reply.status == "success"
    resets = [e for e in reply.events if e.event == "reset"]
    assert resets == [] and reply.resets == 0 and reply.duplicates == 0
    starts = [e.data for e in reply.events if e.event == "run_started"]
    assert [(s["attempt"], s.get("resume_from")) for s in starts] == [(1, None), (2, 3), (3, 3)]
    final = await pod.client.run(thread, run["run_id"])
    assert final["attempt"] == 3 and final["output"] == stored
    assert [a["kind"] for a in final["attempts"]] == ["first", "retry", "retry"]


async def test_a_regenerated_retry_resets_clients_exactly_once(pod: Pod) -> None:
    """With a source that cannot continue, the retry regenerates: one `reset` per new
    attempt that replaced parts the client held."""
    thread = unique()
    options = {
        "chunks": 6,
        "fail": "transient",
        "fail_at": 3,
        "fail_attempts": 1,
        "vary": True,
        "refuse_continue": True,
    }
    await pod.client.post(thread, "x", model_options=options)
    reply = await pod.client.reply(thread)
    # attempt 2 is refused the continuation before it says anything: it regenerates the
    # whole reply (its record says so: no resume_from)
    assert reply.text == mock_reply(6, {0: 2}) and reply.status == "success"
    assert [e.data["attempt"] for e in reply.events if e.event == "reset"] == [2]
    run = (await pod.client.runs(thread))[0]
    assert [(a["attempt"], a.get("resume_from"), a["kept"]) for a in run["attempts"]] == [
        (1, None, 0),
        (2, None, 0),
    ]


async def test_exhausted_retries_end_with_error(pod: Pod) -> None:
    thread = unique()
    run = await pod.client.post(thread, "x", model_options={"fail": "transient"})
    reply = await pod.client.reply(thread)
    assert reply.status == "error" and reply.error and reply.error["code"] == "retries_exhausted"
    assert (await pod.client.run(thread, run["run_id"]))["attempt"] == pod.settings.max_retries + 1
    nxt = await pod.client.post(thread, "y", model_options={"chunks": 1})
    assert (await pod.client.reply(thread)).run_id == nxt["run_id"]


async def test_run_timeout(pod: Pod) -> None:
    thread = unique()
    resp = await pod.http.post(
        f"/threads/{thread}/runs",
        json={"input": "slow", "model_options": SLOW, "timeout_s": 0.3},
    )
    run_id = resp.json()["run_id"]
    reply = await pod.client.reply(thread)
    assert reply.status == "error" and reply.error and reply.error["code"] == "timeout"
    assert (await pod.client.run(thread, run_id))["status"] == "error"
    nxt = await pod.client.post(thread, "next", model_options={"chunks": 1})
    assert (await pod.client.reply(thread)).run_id == nxt["run_id"]


async def test_run_listing_pages_newest_first(pod: Pod) -> None:
    thread = unique()
    ids = [
        (await pod.client.post(thread, f"m{i}", model_options={"chunks": 1}))["run_id"]
        for i in range(5)
    ]
    await wait_status(pod.client, thread, ids[-1], "success")
    page1 = (await pod.http.get(f"/threads/{thread}/runs", params={"limit": 2})).json()
    assert [r["run_id"] for r in page1["runs"]] == ids[::-1][:2]
    page2 = (
        await pod.http.get(
            f"/threads/{thread}/runs", params={"limit": 2, "before": page1["next_before"]}
        )
    ).json()
    assert [r["run_id"] for r in page2["runs"]] == ids[::-1][2:4]


async def test_an_accepted_run_without_workflow_is_enqueued(pod: Pod) -> None:
    """The accepting pod died between storing the run and enqueuing it: reconcile heals it."""
    from threadgate.ids import new_run_id
    from threadgate.store.runs import NewRun

    rt = pod.runtime
    assert rt.adoption is not None
    thread = unique()
    async with rt.store.thread_lock(thread) as conn:
        run = await rt.store.insert_run(
            conn,
            NewRun(
                run_id=new_run_id(),
                thread_id=thread,
                input="lost",
                model_options={"chunks": 2},
                accepted_by="gone-pod",
            ),
        )
    async with rt.db.pool.connection() as conn:  # pretend it was accepted a minute ago
        await conn.execute(
            "UPDATE threadgate.runs SET created_at = now() - interval '1 minute' WHERE run_id = %s",
            (run.run_id,),
        )
    assert await rt.adoption.reconcile() == [run.run_id]
    reply = await pod.client.reply(thread)
    assert reply.run_id == run.run_id and reply.text == mock_reply(2)
    assert await rt.adoption.reconcile() == []


async def test_the_control_subject_takes_only_known_stop_reasons(pod: Pod) -> None:
    """Anyone who can publish on NATS reaches the control subject: a made-up reason (it would
    become the run's status) is ignored, and stops for runs not executing here are not kept."""
    import json

    thread = unique()
    run = await pod.client.post(thread, "x", model_options={"chunks": 30, "delay_ms": 10})
    await wait_status(pod.client, thread, run["run_id"], "running")
    nc = pod.runtime.nc
    assert nc is not None
    subject = pod.settings.control_subject
    await nc.publish(subject, json.dumps({"stop": run["run_id"], "reason": "pwned"}).encode())
    for i in range(2000):
        await nc.publish(
            subject, json.dumps({"stop": f"nobody-{i}", "reason": "cancelled"}).encode()
        )
    await nc.flush()
    final = await wait_status(pod.client, thread, run["run_id"], "success", "error", "cancelled")
    assert final["status"] == "success"
    assert len(pod.runtime.stops) <= 1  # at most a run executing right now
