"""Bad input gets a clear 4xx JSON error and loses nothing already accepted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.integration.conftest import Pod


class AnyOptions:
    """A plug-in reply source without an option check (threadgate.sources allows that)."""

    async def stream(self, prompt: Any) -> AsyncIterator[str]:
        yield "unused"


pytestmark = pytest.mark.integration


def assert_error(resp, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]


@pytest.mark.parametrize("bad", ["a.b", "a*", "%3E", "a%20b", "x" * 129, "caf%C3%A9", "a%00b"])
async def test_bad_thread_ids(pod: Pod, bad: str) -> None:
    resp = await pod.http.post(f"/threads/{bad}/runs", json={"input": "hi"})
    assert_error(resp, 400, "invalid_thread_id")
    assert_error(await pod.http.get(f"/threads/{bad}/attach"), 400, "invalid_thread_id")
    assert_error(await pod.http.get(f"/threads/{bad}/messages"), 400, "invalid_thread_id")


async def test_malformed_json(pod: Pod) -> None:
    resp = await pod.http.post(
        f"/threads/{unique()}/runs", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert_error(resp, 400, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input": ""},
        {"input": "   "},
        {"input": 5},
        {"input": "x", "multitask_strategy": "later"},
        {"input": "x", "unknown": 1},
        {"input": "x", "model_options": {"chunks": -3}},
        {"input": "x", "timeout_s": 0},
    ],
)
async def test_bad_bodies(pod: Pod, body: dict[str, object]) -> None:
    assert_error(
        await pod.http.post(f"/threads/{unique()}/runs", json=body), 400, "invalid_request"
    )


async def test_unknown_runs(pod: Pod) -> None:
    thread = unique()
    assert_error(await pod.http.get(f"/threads/{thread}/runs/not-a-run"), 404, "run_not_found")
    missing = "00000000-0000-4000-8000-000000000000"
    assert_error(await pod.http.get(f"/threads/{thread}/runs/{missing}"), 404, "run_not_found")
    assert_error(
        await pod.http.post(f"/threads/{thread}/runs/{missing}/cancel"), 404, "run_not_found"
    )


async def test_bad_last_event_id(pod: Pod) -> None:
    thread = unique()
    await pod.client.post(thread, "hi", model_options={"chunks": 1})
    resp = await pod.http.get(f"/threads/{thread}/attach", headers={"Last-Event-ID": "abc"})
    assert_error(resp, 400, "invalid_request")


async def test_bad_input_loses_nothing_accepted(pod: Pod) -> None:
    thread = unique()
    good = await pod.client.post(thread, "keep me", model_options={"chunks": 3})
    for body in ({}, {"input": ""}, {"input": "x", "multitask_strategy": "nope"}):
        assert (await pod.http.post(f"/threads/{thread}/runs", json=body)).status_code == 400
    reply = await pod.client.reply(thread)
    assert reply.run_id == good["run_id"]
    assert reply.text == mock_reply(3)
    runs = await pod.client.runs(thread)
    assert [r["run_id"] for r in runs] == [good["run_id"]]


async def test_unknown_route_is_json_404(pod: Pod) -> None:
    assert_error(await pod.http.get("/nope"), 404, "not_found")


async def test_openapi_and_docs(pod: Pod) -> None:
    spec = (await pod.http.get("/openapi.json")).json()
    assert "/threads/{thread_id}/attach" in spec["paths"]
    post = spec["paths"]["/threads/{thread_id}/runs"]["post"]
    assert {"202", "200", "400", "409"} <= set(post["responses"])
    assert (await pod.http.get("/docs")).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
async def test_a_body_without_the_json_content_type_says_so(
    pod: Pod, content_type: str | None
) -> None:
    """`curl -d '{...}'` without `-H 'content-type: application/json'` sends a form."""
    headers = {"content-type": content_type} if content_type else {}
    resp = await pod.http.post(
        f"/threads/{unique()}/runs", content=b'{"input": "hi"}', headers=headers
    )
    assert_error(resp, 400, "invalid_request")
    message = resp.json()["error"]["message"]
    assert "content-type: application/json" in message, message
    assert "valid dictionary" not in message


async def test_json_with_a_charset_is_json(pod: Pod) -> None:
    resp = await pod.http.post(
        f"/threads/{unique()}/runs",
        content=b'{"input": "hi", "model_options": {"chunks": 1}}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert resp.status_code == 202, resp.text


@pytest.mark.parametrize(
    "raw",
    [
        b'{"input": "x", "model_options": {"t": NaN}}',
        b'{"input": "x", "model_options": {"t": Infinity}}',
        b'{"input": "x", "model_options": {"t": -Infinity}}',
        b'{"input": "x", "model_options": {"t": 1e400}}',  # a float that overflows to inf
        b'{"input": "x", "model_options": {"a": [1, {"b": -1e999}]}}',
        b'{"input": "x", "timeout_s": NaN}',
        b'{"input": "x", "timeout_s": Infinity}',
    ],
    ids=["nan", "inf", "-inf", "1e400", "nested", "timeout-nan", "timeout-inf"],
)
async def test_non_finite_numbers_are_400(
    pod: Pod, raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's JSON parser takes NaN and Infinity (and 1e400 becomes inf); PostgreSQL's jsonb
    refuses them: these were 500s. The mock checks its own options; a plug-in source may take
    any (as this one does), so the API refuses what cannot be stored whatever the source."""
    monkeypatch.setattr(pod.runtime, "source", AnyOptions())
    resp = await pod.http.post(
        f"/threads/{unique()}/runs", content=raw, headers={"content-type": "application/json"}
    )
    assert_error(resp, 400, "invalid_request")
