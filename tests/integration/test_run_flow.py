"""A run end to end in-process: POST, attach, status, messages, ordering, resume."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from threadgate.client import Reply
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.integration.conftest import Pod
from tests.multipod.cluster import wait_run

pytestmark = pytest.mark.integration


async def test_post_attach_status_messages(pod: Pod) -> None:
    thread = unique()
    accepted = await pod.client.post(thread, "hello", model_options={"chunks": 8})
    assert accepted["status"] == "pending"
    reply = await pod.client.reply(thread)
    assert reply.text == mock_reply(8)
    assert reply.status == "success"
    assert reply.resets == 0
    assert [e.event for e in reply.events] == ["run_started"] + ["chunk"] * 8 + ["done"]
    run = await pod.client.run(thread, accepted["run_id"])
    assert run["status"] == "success"
    assert run["attempt"] == 1
    assert run["executor"] == "itest-0"
    assert run["output"] == mock_reply(8)
    messages = await pod.client.messages(thread)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "hello"),
        ("assistant", mock_reply(8)),
    ]


async def test_attach_after_done_replays_the_finished_run(pod: Pod) -> None:
    thread = unique()
    await pod.client.post(thread, "hi", model_options={"chunks": 5})
    first = await pod.client.reply(thread)
    again = await pod.client.reply(thread)
    assert again.text == first.text == mock_reply(5)
    assert [e.id for e in again.events] == [e.id for e in first.events]


async def test_attach_with_no_run_is_204_when_asked_not_to_wait(pod: Pod) -> None:
    resp = await pod.http.get(f"/threads/{unique()}/attach", params={"wait": "false"})
    assert resp.status_code == 204


async def test_attach_before_the_first_run_waits_for_it(pod: Pod) -> None:
    """The README's quick start attaches first, then posts: the attach waits (keepalives)."""
    thread = unique()
    waiting = asyncio.create_task(pod.client.reply(thread))
    # Attached and waiting: the pod counts the client on the thread's tail.
    while pod.runtime.hub is None or thread not in pod.runtime.hub.tails:  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # polls the pod's own state: attach has no event to await
    run = await pod.client.post(thread, "hello", model_options={"chunks": 4})
    reply = await asyncio.wait_for(waiting, 30)
    assert reply.run_id == run["run_id"] and reply.text == mock_reply(4)


async def test_resuming_after_a_runs_done_answers_204(pod: Pod) -> None:
    """An EventSource reconnects after a stream ends; at or past `done` it must stop: 204."""
    thread = unique()
    await pod.client.post(thread, "hi", model_options={"chunks": 2})
    reply = await pod.client.reply(thread)
    done_id = reply.events[-1].id
    assert reply.events[-1].event == "done" and done_id
    # The id of `done`; a v2 id (a stream sequence) at or past the subject's newest event.
    done_seq = int(done_id.split(".")[3])
    for last in (done_id, str(done_seq), str(done_seq + 5)):
        resp = await pod.http.get(f"/threads/{thread}/attach", headers={"Last-Event-ID": last})
        assert resp.status_code == 204, last
    earlier = await pod.http.get(
        f"/threads/{thread}/attach", headers={"Last-Event-ID": reply.events[-2].id or ""}
    )
    assert earlier.status_code == 200 and "event: done" in earlier.text


async def test_two_runs_on_one_thread_run_one_after_the_other(pod: Pod) -> None:
    thread = unique()
    a = await pod.client.post(thread, "first", model_options={"chunks": 10, "delay_ms": 10})
    b = await pod.client.post(thread, "second", model_options={"chunks": 3})
    reply_b = await pod.client.reply(thread)  # attach follows the latest run
    assert reply_b.run_id == b["run_id"]
    assert reply_b.text == mock_reply(3)
    run_a = await wait_run(pod.client, thread, a["run_id"])
    run_b = await wait_run(pod.client, thread, b["run_id"])
    assert run_a["status"] == run_b["status"] == "success"
    # Parsed, not compared as text: an offset or a fraction of a second written differently
    # would order the strings wrongly.
    a_finished, b_started = at(run_a["finished_at"]), at(run_b["started_at"])
    assert at(run_a["created_at"]) <= at(run_a["started_at"]) <= a_finished <= b_started
    assert b_started <= at(run_b["finished_at"])
    roles = [(m["role"], m["run_id"]) for m in await pod.client.messages(thread)]
    assert roles == [
        ("user", a["run_id"]),
        ("assistant", a["run_id"]),
        ("user", b["run_id"]),
        ("assistant", b["run_id"]),
    ]


def at(timestamp: str) -> datetime:
    """An API timestamp: ISO 8601 with its UTC offset (a naive one would compare wrongly)."""
    parsed = datetime.fromisoformat(timestamp)
    assert parsed.utcoffset() is not None, timestamp
    return parsed


async def test_last_event_id_resumes_without_gap_or_duplicate(pod: Pod) -> None:
    thread = unique()
    await pod.client.post(thread, "go", model_options={"chunks": 12})
    full = await pod.client.reply(thread)
    cut = full.events[5]  # a chunk in the middle
    assert cut.event == "chunk" and cut.id
    resp = await pod.http.get(f"/threads/{thread}/attach", headers={"Last-Event-ID": cut.id})
    from threadgate.client import parse_sse

    async def lines():  # type: ignore[no-untyped-def]
        for line in resp.text.split("\n"):
            yield line

    rest = [ev async for ev in parse_sse(lines())]
    assert [e.id for e in rest] == [e.id for e in full.events[6:]]
    resumed = Reply()
    for ev in full.events[:6] + rest:
        resumed.apply(ev)
    assert resumed.text == mock_reply(12)


async def test_attach_right_after_post_waits_for_the_run(pod: Pod) -> None:
    thread = unique()
    await pod.client.post(thread, "one", model_options={"chunks": 2})
    await pod.client.reply(thread)
    second = await pod.client.post(thread, "two", model_options={"chunks": 4})
    reply = await asyncio.wait_for(pod.client.reply(thread), 30)
    assert reply.run_id == second["run_id"]
    assert reply.text == mock_reply(4)


async def test_the_client_pages_through_a_threads_runs(pod: Pod) -> None:
    thread = unique()
    posted = [
        (await pod.client.post(thread, f"m{i}", model_options={"chunks": 1}))["run_id"]
        for i in range(5)
    ]
    newest_first = list(reversed(posted))
    assert [r["run_id"] for r in await pod.client.runs(thread, limit=2)] == newest_first[:2]
    page = await pod.http.get(f"/threads/{thread}/runs", params={"limit": 2})
    assert page.json()["next_before"] is not None
    assert [r["run_id"] for r in await pod.client.runs(thread, limit=None)] == newest_first


async def test_a_begin_sent_again_gets_the_attempt_it_made(pod: Pod) -> None:
    """A begin whose answer was lost (a failover, a connection broken after the commit) and
    is sent again gets the attempt it made: not another one, and no replay counted."""
    thread = unique()
    run_id = (await pod.client.post(thread, "x", model_options={"chunks": 2}))["run_id"]
    assert (await wait_run(pod.client, thread, run_id))["status"] == "success"
    store, name = pod.runtime.store, pod.settings.pod_name

    async def begin(token: str, kind: str) -> tuple[int, int, int]:
        run = await store.begin_attempt(run_id, name, kind=kind, timeout_s=60, begin=token)
        assert run is not None
        return run.attempt, run.replays, len(run.attempts)

    assert await begin("b1", "first") == (2, 1, 2)  # a replay: counted
    assert await begin("b1", "first") == (2, 1, 2)  # the same begin again: the same attempt
    assert await begin("b2", "retry") == (3, 1, 3)
    assert await begin("b2", "retry") == (3, 1, 3)
    assert await begin("b1", "first") == (4, 2, 4)  # not the latest begin: a new attempt
