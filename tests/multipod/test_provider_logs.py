"""The operator's provider key never reaches the pod's log, whatever the provider answers.

A `threadgate serve` pod at DEBUG in OpenAI mode against the fake provider, driven through
every error mode it has — non-200 answers, error events in the stream, malformed events, a
stall, a dropped connection, answers whose headers or bodies echo the request's headers
(`Authorization: Bearer <key>` included) — and a plain reply. Then the whole log is searched
for the key, any 12 characters of it, and `Bearer sk-`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.conftest import unique
from tests.fakes.openai_server import ECHO_MODES, FakeOpenAI, serve_fake
from tests.multipod.cluster import wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod

MODES = ("stream", "400", "429", "500", "flaky:1", "stall", "drop", *ECHO_MODES)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    async with serve_fake() as served:
        yield served


async def test_no_provider_key_in_the_log(
    start_cluster: StartCluster, fake: tuple[FakeOpenAI, str]
) -> None:
    server, url = fake
    key = f"sk-live-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    cluster = await start_cluster(
        size=1,
        model="openai",
        openai_base_url=url,
        openai_api_key=key,
        openai_timeout_s=2,
        max_retries=1,
        retry_base_s=0.05,
        retry_cap_s=0.1,
        log_level="DEBUG",
    )
    client = cluster.client()
    runs = {}
    for mode in MODES:
        thread = unique()
        runs[mode] = (thread, (await client.post(thread, mode))["run_id"])
    ended = {mode: await wait_run(client, t, r, timeout=60) for mode, (t, r) in runs.items()}
    assert ended["stream"]["status"] == "success"
    succeeded = {m for m, run in ended.items() if run["status"] != "error"}
    assert succeeded == {"stream", "flaky:1", "echo-header"}
    # Every mode reached the provider with the key: the log had every chance to hold it.
    assert {r["auth"] for r in server.requests} == {f"Bearer {key}"}
    echoed = {m for m in ECHO_MODES if server.seen[m]}
    assert echoed == set(ECHO_MODES)

    log = cluster.pods[0].log_text()
    # What was logged is there (masked), so a clean log is not an empty one.
    assert "model provider answered 401" in log and "model provider error event" in log
    assert "model provider request: POST" in log and "'Authorization': '***'" in log
    assert "Bearer sk-" not in log
    leaked = [key[i : i + 12] for i in range(len(key) - 11) if key[i : i + 12] in log]
    assert not leaked, leaked
