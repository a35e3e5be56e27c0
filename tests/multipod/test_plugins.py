"""Plug-in reply sources on real pods (THREADGATE_MODEL=package.module:factory): options checked
by the source at POST time, a plug-in's own exception and oversized data events ending the
run `error`, data events streamed, replayed and stored as parts, and the examples/ agents
across a crash of the pod running them: every client ends with exactly one copy of the reply
and its data events, equal to the stored message's parts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from threadgate.client import DataPart, Reply, TextPart, ThreadgateError

from tests.conftest import Stack, unique
from tests.fakes.openai_server import FakeOpenAI, serve_fake, tool_answer
from tests.multipod.cluster import (
    FAULT_EXIT,
    Attacher,
    Cluster,
    pod_env,
    running_on,
    unique_names,
    wait_run,
)
from tests.multipod.conftest import StartCluster
from tests.plugins import SECRET, reply

pytestmark = pytest.mark.multipod

MAX_DATA_BYTES = 1000


@pytest.fixture(scope="module")
async def scripted(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Cluster]:
    """One pod on tests.plugins:scripted, shared by the tests of this module that need it."""
    stream, prefix = unique_names()
    env = pod_env(
        database_url=stack.new_database("mp"),
        nats_url=stack.nats.url,
        stream=stream,
        prefix=prefix,
        model="tests.plugins:scripted",
        max_data_bytes=MAX_DATA_BYTES,
    )
    cluster = Cluster(env, tmp_path_factory.mktemp("pods"), 1)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


def as_stored(parts: list[TextPart | DataPart]) -> list[dict[str, Any]]:
    """A client's reconstructed parts in the shape of a stored message's `parts`."""
    return [
        {"type": "text", "text": p.text}
        if isinstance(p, TextPart)
        else {"type": "data", "name": p.name, "payload": p.payload}
        for p in parts
    ]


async def assistant_message(cluster: Cluster, thread: str, run_id: str) -> dict[str, Any]:
    async with cluster.client() as client:
        (message,) = [
            m
            for m in await client.messages(thread)
            if m["run_id"] == run_id and m["role"] == "assistant"
        ]
    return message


def assert_once(reply: Reply, stored: dict[str, Any]) -> None:
    """Exactly one copy of the stored reply: its text and its parts, nothing received twice."""
    assert reply.status == "success" and reply.duplicates == 0
    assert reply.text == stored["content"]
    assert as_stored(reply.parts) == stored["parts"]


# ---- the plug-in path ---------------------------------------------------------------------------


async def test_a_plugin_checks_its_options_at_post_time(scripted: Cluster) -> None:
    thread = unique()
    async with scripted.client() as client:
        with pytest.raises(ThreadgateError) as refused:
            await client.post(thread, "hi", model_options={"color": "red"})
        assert refused.value.status == 400
        assert refused.value.body == {
            "error": {
                "code": "invalid_request",
                "message": "model_options: the scripted source has no colors",
            }
        }
        assert await client.runs(thread) == []  # nothing was accepted


async def test_data_events_stream_replay_and_are_stored_in_order(scripted: Cluster) -> None:
    thread = unique()
    live = Attacher(scripted.urls, thread).start()  # waits for the thread's first run
    async with scripted.client() as client:
        run_id = (await client.post(thread, "hi", model_options={"delay_ms": 20}))["run_id"]
    got = await live.result()
    parts = [e for e in got.events if e.event in ("chunk", "data")]
    assert [e.data["index"] for e in parts] == list(range(len(reply())))
    data = [e for e in parts if e.event == "data"]
    assert [e.data for e in data] == [
        {"run_id": run_id, "attempt": 1, "index": 1, "name": "step", "payload": {"n": 1}},
        {"run_id": run_id, "attempt": 1, "index": 4, "name": "step", "payload": {"n": 2}},
    ]
    assert got.parts == [
        TextPart("a "),
        DataPart("step", {"n": 1}),
        TextPart("b c "),
        DataPart("step", {"n": 2}),
        TextPart("d "),
    ]
    stored = await assistant_message(scripted, thread, run_id)
    assert stored["content"] == "a b c d "
    assert_once(got, stored)

    late = await Attacher(scripted.urls, thread).start().result()  # a replay from the start
    assert_once(late, stored)
    assert [(e.event, e.data) for e in late.events if e.event in ("chunk", "data")] == [
        (e.event, e.data) for e in parts
    ]


async def test_a_plugins_own_exception_ends_the_run_without_its_message(
    scripted: Cluster,
) -> None:
    thread = unique()
    async with scripted.client() as client:
        run_id = (await client.post(thread, "secret"))["run_id"]
        got = await client.reply(thread)
        error = {"code": "model_permanent", "message": "the reply source failed: ValueError"}
        assert (got.status, got.error, got.text) == ("error", error, "a ")
        run = await wait_run(client, thread, run_id)
        assert (run["status"], run["error"]) == ("error", error)
        runs, messages = await client.runs(thread), await client.messages(thread)
        seen = json.dumps([[e.data for e in got.events], run, runs, messages])
    assert SECRET not in seen
    assert SECRET in scripted.pods[0].log_text()  # the operator's log has it, with its traceback


@pytest.mark.parametrize(
    ("said", "message"),
    [
        ("big", f"a data event is larger than {MAX_DATA_BYTES} bytes"),
        ("bad name", "a data event's name must match ^[A-Za-z0-9_.:-]{1,64}$"),
    ],
)
async def test_a_data_event_that_breaks_the_rules_ends_the_run(
    scripted: Cluster, said: str, message: str
) -> None:
    thread = unique()
    async with scripted.client() as client:
        await client.post(thread, said)
        got = await client.reply(thread)
    assert got.status == "error"
    assert got.error == {"code": "invalid_data_event", "message": message}
    assert not got.data  # the event was refused, not streamed


# ---- the example agents across a crash --------------------------------------------------------

QUESTION = " ".join(f"w{i}" for i in range(30))  # the echo agent's reply: 32 parts


@pytest.mark.cluster(size=2, model="examples.echo_agent:make")
async def test_echo_agent_continues_its_reply_after_its_pod_is_killed(cluster: Cluster) -> None:
    thread = unique()
    async with cluster.client() as client:
        run_id = (await client.post(thread, QUESTION, model_options={"delay_ms": 60}))["run_id"]
        victim = await running_on(client, cluster, thread, run_id)
        (survivor,) = cluster.others(victim.name)
        on_survivor = Attacher([survivor.url], thread).start()
        # The victim's own client: its connection breaks; it resumes on the survivor.
        on_victim = Attacher([victim.url, survivor.url], thread, reconnects=10).start()
        everyone = [on_survivor, on_victim]
        await asyncio.gather(*(a.wait_chunk(8) for a in everyone))
        await victim.kill()
        await victim.restart()
        replies = await asyncio.gather(*(a.result() for a in everyone))
        run = await wait_run(client, thread, run_id)
    assert run["status"] == "success" and run["attempt"] == 2
    assert run["attempts"][1]["resume_from"] >= 9  # continued after what was streamed

    stored = await assistant_message(cluster, thread, run_id)
    assert stored["content"] == QUESTION + " "
    assert [p["type"] for p in stored["parts"]] == ["data", "text", "data"]
    assert [p.get("name") for p in stored["parts"]] == ["plan", None, "citation"]
    late = await Attacher(cluster.urls, thread).start().result()
    for got in [*replies, late]:
        assert_once(got, stored)
        assert got.resets == 0 and "reset" not in [e.event for e in got.events]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    async with serve_fake() as served:
        yield served


async def tool_agent_killed_at(
    start_cluster: StartCluster, fake: tuple[FakeOpenAI, str], point: str
) -> tuple[Cluster, str, str, Reply]:
    """A one-pod cluster on the tool agent whose process dies at `point`, restarted (same
    name, no fault point); a client attached throughout. The thread, run id, its reply."""
    cluster = await start_cluster(
        size=1,
        model="examples.tool_agent:make",
        openai_base_url=fake[1],
        openai_timeout_s=5,
        fault_point=point,
    )
    pod = cluster.pods[0]
    thread = unique()
    async with cluster.client() as client:
        run_id = (await client.post(thread, "weather in Paris"))["run_id"]
        live = Attacher([pod.url], thread, reconnects=30).start()
        assert await pod.wait_exit(30) == FAULT_EXIT
        await pod.restart({"THREADGATE_FAULT_POINT": ""})
        return cluster, thread, run_id, await live.result()


def tool_results(fake: FakeOpenAI) -> list[list[str]]:
    """The tool results each request of the fake carried back to it."""
    return [
        [m["content"] for m in r["body"]["messages"] if m["role"] == "tool"] for r in fake.requests
    ]


async def test_tool_agent_continues_after_its_tools_without_running_them_again(
    start_cluster: StartCluster, fake: tuple[FakeOpenAI, str]
) -> None:
    # Part 1 is the tool's result: the process dies once it is in the stream.
    cluster, thread, run_id, got = await tool_agent_killed_at(start_cluster, fake, "chunk:1")
    async with cluster.client() as client:
        run = await wait_run(client, thread, run_id)
    assert run["status"] == "success" and run["attempt"] == 2
    assert run["attempts"][1]["resume_from"] == 2
    paris = json.dumps({"city": "Paris", "temp_c": 18, "sky": "cloudy"})
    # One request with the question, one with the tool's result: the model was not asked
    # again, the tool did not run again.
    assert tool_results(fake[0]) == [[], [paris]]

    stored = await assistant_message(cluster, thread, run_id)
    assert stored["content"] == tool_answer([paris])
    assert [(p["type"], p.get("name")) for p in stored["parts"]] == [
        ("data", "tool_call"),
        ("data", "tool_result"),
        ("text", None),
    ]
    late = await Attacher(cluster.urls, thread).start().result()
    for reply_ in (got, late):
        assert_once(reply_, stored)
        assert reply_.resets == 0


async def test_tool_agent_killed_mid_answer_regenerates_the_reply_once(
    start_cluster: StartCluster, fake: tuple[FakeOpenAI, str]
) -> None:
    # Parts 2.. are the answer's text: it cannot be continued, the reply is regenerated.
    cluster, thread, run_id, got = await tool_agent_killed_at(start_cluster, fake, "chunk:4")
    async with cluster.client() as client:
        run = await wait_run(client, thread, run_id)
    assert run["status"] == "success" and run["attempt"] == 2
    # Attempt 2 would have continued after 5 parts; the agent refused before anything was
    # announced, and attempt 2 regenerated the reply itself (its record: kept 0).
    assert [a.get("kept") for a in run["attempts"]] == [0, 0]
    paris = json.dumps({"city": "Paris", "temp_c": 18, "sky": "cloudy"})
    assert tool_results(fake[0]) == [[], [paris], [], [paris]]

    stored = await assistant_message(cluster, thread, run_id)
    assert stored["content"] == tool_answer([paris])
    assert_once(got, stored)
    # The partial answer it had, if it attached in time to see one, was dropped once.
    saw_it = any(e.data["attempt"] < 2 for e in got.events if e.event in ("chunk", "data"))
    assert got.resets == int(saw_it)
    late = await Attacher(cluster.urls, thread).start().result()
    assert_once(late, stored)
    assert late.resets == 0
