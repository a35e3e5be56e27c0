"""GET /threads/{t}/attach?format=ai-sdk: the same run as the Vercel AI SDK's UI message stream."""

from __future__ import annotations

import json

import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration


async def test_attach_speaks_the_ai_sdk_ui_message_stream(pod: Pod) -> None:
    thread = unique()
    run = await pod.client.post(thread, "hi", model_options={"chunks": 3})
    resp = await pod.http.get(f"/threads/{thread}/attach", params={"format": "ai-sdk"})
    assert resp.status_code == 200
    assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
    lines = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    parts = [json.loads(line) for line in lines[:-1]]
    assert parts[0]["type"] == "start" and parts[0]["messageId"] == run["run_id"]
    text = "".join(p["delta"] for p in parts if p["type"] == "text-delta")
    assert text == mock_reply(3) and parts[-1]["type"] == "finish"
    # A thread with no run: nothing to resume (useChat's resume expects 204).
    empty = await pod.http.get(f"/threads/{unique()}/attach", params={"format": "ai-sdk"})
    assert empty.status_code == 204


@pytest.mark.parametrize("fmt", [None, "ai-sdk"])
async def test_attach_tells_proxies_not_to_buffer(pod: Pod, fmt: str | None) -> None:
    """`X-Accel-Buffering: no` on both formats: nginx (and proxies that honour it) would
    otherwise hold the stream's events back in its buffer."""
    thread = unique()
    await pod.client.post(thread, "hi", model_options={"chunks": 1})
    params = {"format": fmt} if fmt else {}
    async with pod.http.stream("GET", f"/threads/{thread}/attach", params=params) as resp:
        assert resp.status_code == 200
        assert resp.headers.get("x-accel-buffering") == "no"
