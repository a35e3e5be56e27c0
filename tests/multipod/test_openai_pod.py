"""A pod on the OpenAI-compatible provider (a local fake): history, retries, permanent errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import unique
from tests.fakes.openai_server import FakeOpenAI, reply_text, serve_fake
from tests.multipod.cluster import wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    async with serve_fake() as served:
        yield served


async def test_openai_pod(start_cluster: StartCluster, fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    cluster = await start_cluster(
        size=1,
        model="openai",
        openai_base_url=url,
        openai_api_key="sk-fake",
        openai_timeout_s=5,
        retry_base_s=0.05,
        retry_cap_s=0.2,
    )
    client = cluster.client()
    thread = unique()

    first = await client.post(thread, "stream")
    reply = await client.reply(thread)
    assert reply.run_id == first["run_id"] and reply.text == reply_text()

    # The thread's history is the prompt of its next run.
    await client.post(thread, "flaky:2")
    retried = await client.reply(thread)
    assert retried.text == reply_text() and retried.status == "success"
    prompt = [(m["role"], m["content"]) for m in server.requests[-1]["body"]["messages"]]
    assert prompt == [("user", "stream"), ("assistant", reply_text()), ("user", "flaky:2")]
    runs = await client.runs(thread)
    assert runs[0]["attempt"] == 3

    bad = await client.post(thread, "400")
    failed = await client.reply(thread)
    assert failed.status == "error" and failed.error and failed.error["code"] == "model_permanent"
    assert (await wait_run(client, thread, bad["run_id"]))["output"] is None

    last = await client.post(thread, "stream")
    assert (await client.reply(thread)).run_id == last["run_id"]
    roles = [m["role"] for m in await client.messages(thread)]
    assert roles == ["user", "assistant", "user", "assistant", "user", "user", "assistant"]
