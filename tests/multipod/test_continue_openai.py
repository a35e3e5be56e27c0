"""The OpenAI-compatible source continues a reply after a pod kill, in each server convention.

The fake server streams `w{i}.{r} ` (r: which of its streams for that message), one word every
50 ms, counts every word it streams across requests, and continues after a prefix when the
request ends with the reply so far. A crash may cost at most the word in flight.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import unique
from tests.fakes.openai_server import FakeOpenAI, serve_fake
from tests.multipod.cluster import Attacher, running_on, wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod

WORDS = 40


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    async with serve_fake() as served:
        yield served


def words(spans: dict[int, int]) -> str:
    """The reply built from streams: {first word: stream number}."""
    starts = sorted(spans)
    return "".join(f"w{i}.{spans[max(s for s in starts if s <= i)]} " for i in range(WORDS))


@pytest.mark.parametrize("mode", ["continue_final_message", "prefix", "prefill"])
async def test_a_killed_reply_continues_with_at_most_one_word_wasted(
    start_cluster: StartCluster, fake: tuple[FakeOpenAI, str], mode: str
) -> None:
    server, url = fake
    cluster = await start_cluster(
        size=2, model="openai", openai_base_url=url, openai_continue=mode, openai_timeout_s=10
    )
    thread, ask = unique(), f"long:{WORDS}:50"
    async with cluster.client() as client:
        run = await client.post(thread, ask)
        victim = await running_on(client, cluster, thread, run["run_id"])
        survivor = cluster.others(victim.name)[0]
        watcher = Attacher([survivor.url], thread).start()
        await watcher.wait_chunk(10)
        await victim.kill()
        await victim.restart()
        final = await wait_run(client, thread, run["run_id"], timeout=60)
        reply = await watcher.result(30)
    assert final["status"] == "success" and final["attempt"] == 2
    kept = final["attempts"][1]["resume_from"]
    assert kept >= 10
    assert final["output"] == words({0: 1, kept: 2}) == reply.text
    assert reply.resets == 0 and reply.duplicates == 0
    wasted = server.generated[ask] - WORDS
    print(f"\n{mode}: kept {kept} words, wasted {wasted}")
    assert 0 <= wasted <= 1
    (shape,) = server.continuations
    assert shape["prefix_flag"] is (mode == "prefix")
    assert shape["continue_final_message"] is (mode == "continue_final_message")
    if mode == "continue_final_message":
        assert shape["add_generation_prompt"] is False


async def test_a_server_that_refuses_to_continue_regenerates_with_a_reset(
    start_cluster: StartCluster, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    cluster = await start_cluster(
        size=2, model="openai", openai_base_url=url, openai_continue="prefill"
    )
    thread, ask = unique(), f"long:{WORDS}:50:refuse"
    async with cluster.client() as client:
        run = await client.post(thread, ask)
        victim = await running_on(client, cluster, thread, run["run_id"])
        watcher = Attacher([cluster.others(victim.name)[0].url], thread).start()
        await watcher.wait_chunk(10)
        await victim.kill()
        await victim.restart()
        final = await wait_run(client, thread, run["run_id"], timeout=60)
        reply = await watcher.result(30)
    # attempt 2 asked to continue (400) and, refused before it announced anything,
    # regenerated the reply itself: the fake's stream 2
    assert final["status"] == "success" and final["attempt"] == 2
    assert final["output"] == words({0: 2}) == reply.text
    assert [e.data["attempt"] for e in watcher.events if e.event == "reset"] == [2]
    assert len(server.continuations) == 1
