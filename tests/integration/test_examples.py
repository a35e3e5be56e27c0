"""The example plug-ins (examples/) as sources: the tool agent against the fake OpenAI server
(which learns tool calls), the echo agent alone; each one's continuation and option checks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from threadgate.devstack import free_port
from threadgate.errors import InvalidRequest
from threadgate.registry import load_source
from threadgate.settings import load_settings
from threadgate.sources import (
    ContinuationRefused,
    Data,
    Part,
    PermanentSourceError,
    Prompt,
    TransientSourceError,
    check_options,
    continues,
    reads_history,
)

from examples.echo_agent import EchoAgent
from examples.tool_agent import ToolAgent
from examples.tool_agent.tools import run_tool
from tests.fakes.openai_server import FakeOpenAI, reply_text, serve_fake, tool_answer

pytestmark = pytest.mark.integration

PARIS = {"city": "Paris", "temp_c": 18, "sky": "cloudy"}


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    async with serve_fake() as served:
        yield served


def tool_agent(url: str, timeout: float = 5.0) -> ToolAgent:
    source = load_source(
        load_settings(
            model="examples.tool_agent:make",
            openai_base_url=url,
            openai_api_key="sk-test",
            openai_model="fake-1",
            openai_timeout_s=timeout,
        )
    )
    assert isinstance(source, ToolAgent)
    return source


async def reply(
    source: Any, text: str, prefix: tuple[Part, ...] = (), **options: Any
) -> list[Part]:
    prompt = Prompt(
        messages=[{"role": "user", "content": text}], options=options, prefix_parts=prefix
    )
    return [part async for part in source.stream(prompt)]


def streamed(parts: list[Part]) -> tuple[Part, ...]:
    """Parts as a continuing attempt gets them: read back from the stream (JSON payloads)."""
    return tuple(
        Data(p.name, json.loads(json.dumps(p.payload))) if isinstance(p, Data) else p for p in parts
    )


def text_of(parts: list[Part]) -> str:
    return "".join(p for p in parts if isinstance(p, str))


async def test_tool_agent_calls_the_tools_and_answers_from_their_results(
    fake: tuple[FakeOpenAI, str],
) -> None:
    server, url = fake
    before = len(server.requests)
    parts = await reply(tool_agent(url), "weather in Paris and calc: 2+3 please")

    data = [p for p in parts if isinstance(p, Data)]
    calls = [d.payload for d in data if d.name == "tool_call"]
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("calculate", {"expression": "2+3"}),
    ]
    results = [d.payload for d in data if d.name == "tool_result"]
    assert [(r["id"], r["result"]) for r in results] == [
        (calls[0]["id"], PARIS),
        (calls[1]["id"], {"expression": "2+3", "value": 5}),
    ]
    # The calls, then their results, then the answer; the answer is built from the results.
    assert parts[:4] == data
    assert text_of(parts) == tool_answer([json.dumps(r["result"]) for r in results])

    first, second = (r["body"] for r in server.requests[before:])
    assert {t["function"]["name"] for t in first["tools"]} == {"get_weather", "calculate"}
    assert first["stream"] is True and first["model"] == "fake-1"
    assistant, *tool_messages = second["messages"][1:]
    assert [c["id"] for c in assistant["tool_calls"]] == [c["id"] for c in calls]
    assert [m["tool_call_id"] for m in tool_messages] == [c["id"] for c in calls]


async def test_tool_agent_without_a_tool_to_call_streams_the_text(
    fake: tuple[FakeOpenAI, str],
) -> None:
    assert await reply(tool_agent(fake[1]), "stream") == [f"word-{i} " for i in range(5)]
    assert text_of(await reply(tool_agent(fake[1]), "what is the weather?")) == reply_text()


async def test_a_tool_error_goes_back_to_the_model(fake: tuple[FakeOpenAI, str]) -> None:
    parts = await reply(tool_agent(fake[1]), "weather in Atlantis")
    error = {"error": "no weather for 'Atlantis'"}
    result = parts[1]
    assert isinstance(result, Data) and result.name == "tool_result"
    assert result.payload["result"] == error
    assert text_of(parts) == tool_answer([json.dumps(error)])


async def test_tool_agent_continues_after_its_tool_phase_without_running_a_tool_again(
    fake: tuple[FakeOpenAI, str],
) -> None:
    server, url = fake
    agent = tool_agent(url)
    assert continues(agent) and reads_history(agent)
    whole = await reply(agent, "weather in Paris")
    tool_phase = streamed(whole[:2])  # the call and its result: where an attempt died
    before = len(server.requests)
    rest = await reply(agent, "weather in Paris", tool_phase)
    assert rest == whole[2:]  # the answer only: no tool ran again
    # One request, carrying the rebuilt call and result: the fake refuses unanswered calls.
    (request,) = server.requests[before:]
    roles = [m["role"] for m in request["body"]["messages"]]
    assert roles == ["user", "assistant", "tool"]


async def test_tool_agent_runs_a_call_whose_result_was_not_streamed(
    fake: tuple[FakeOpenAI, str],
) -> None:
    agent = tool_agent(fake[1])
    whole = await reply(agent, "calc: 6*7")
    call = whole[0]
    assert isinstance(call, Data) and call.name == "tool_call"
    rest = await reply(agent, "calc: 6*7", streamed(whole[:1]))  # died after the tool_call
    assert rest == whole[1:]
    result = {"expression": "6*7", "value": 42}
    assert rest[0] == Data(
        "tool_result", {"id": call.payload["id"], "name": "calculate", "result": result}
    )


async def test_tool_agent_refuses_to_continue_text(fake: tuple[FakeOpenAI, str]) -> None:
    agent = tool_agent(fake[1])
    whole = await reply(agent, "weather in Paris")
    with pytest.raises(ContinuationRefused):
        await reply(agent, "weather in Paris", streamed(whole[:3]))  # mid-answer
    with pytest.raises(ContinuationRefused):
        await reply(agent, "stream", ("word-0 ",))


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("429", TransientSourceError),
        ("500", TransientSourceError),
        ("drop", TransientSourceError),
        ("400", PermanentSourceError),
    ],
)
async def test_tool_agent_error_classes(
    fake: tuple[FakeOpenAI, str], mode: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as raised:
        await reply(tool_agent(fake[1]), mode)
    assert "sk-test" not in str(raised.value)


async def test_tool_agent_stall_and_unreachable_api_are_transient(
    fake: tuple[FakeOpenAI, str],
) -> None:
    with pytest.raises(TransientSourceError):
        await reply(tool_agent(fake[1], timeout=0.5), "stall")
    with pytest.raises(TransientSourceError):
        await reply(tool_agent(f"http://127.0.0.1:{free_port()}/v1"), "weather in Paris")


async def test_tool_agent_checks_its_options(fake: tuple[FakeOpenAI, str]) -> None:
    agent = tool_agent(fake[1])
    check_options(agent, {"temperature": 0.2})
    for bad in ({"temperature": 3}, {"temperature": "hot"}, {"max_tokens": 10}):
        with pytest.raises(InvalidRequest, match=r"^model_options: "):
            check_options(agent, bad)


def test_tools_answer_bad_calls_with_an_error_result() -> None:
    assert run_tool("calculate", {"expression": "(1+2)*-3"}) == {
        "expression": "(1+2)*-3",
        "value": -9,
    }
    for name, arguments in [
        ("calculate", {"expression": "__import__('os')"}),
        ("calculate", {"expression": "1/0"}),
        ("calculate", {"expression": "9**99"}),
        ("get_weather", {"city": "Atlantis"}),
        ("get_weather", "Paris"),
        ("rm_rf", {}),
    ]:
        assert set(run_tool(name, arguments)) == {"error"}


# ---- the echo agent ---------------------------------------------------------------------------


def echo() -> EchoAgent:
    source = load_source(load_settings(model="examples.echo_agent:make"))
    assert isinstance(source, EchoAgent)
    return source


async def test_echo_agent_plans_echoes_and_cites() -> None:
    parts = await reply(echo(), "how  are you", delay_ms=0)
    assert parts == [
        Data("plan", {"steps": ["read the question", "echo it", "cite the source"]}),
        "how ",
        "are ",
        "you ",
        Data("citation", {"source": "your message", "words": 3}),
    ]


async def test_echo_agent_continues_after_any_prefix() -> None:
    agent = echo()
    assert continues(agent) and not reads_history(agent)
    whole = await reply(agent, "one two three", delay_ms=0)
    for k in range(len(whole) + 1):
        rest = await reply(agent, "one two three", streamed(whole[:k]), delay_ms=0)
        assert [*whole[:k], *rest] == whole, k


async def test_echo_agent_refuses_a_prefix_that_is_not_its_own() -> None:
    with pytest.raises(ContinuationRefused):
        await reply(echo(), "one two", (Data("plan", {"steps": []}),), delay_ms=0)
    plan = (await reply(echo(), "one two", delay_ms=0))[0]
    with pytest.raises(ContinuationRefused):
        await reply(echo(), "one two", (plan, "three "), delay_ms=0)


def test_echo_agent_checks_its_options() -> None:
    check_options(echo(), {"delay_ms": 0})
    for bad in ({"delay_ms": -1}, {"delay_ms": "fast"}, {"chunks": 3}):
        with pytest.raises(InvalidRequest, match="delay_ms"):
            check_options(echo(), bad)
