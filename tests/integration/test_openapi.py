"""The OpenAPI document says what the server sends: real answers, valid and refused, are
checked against it (schemathesis' response validation), and a 400 names the field and rule."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from threadgate.models.mock import MOCK_OPTIONS

from tests.conftest import unique
from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


async def test_validation_errors_are_documented_as_the_400_error_body(pod: Pod) -> None:
    spec = (await pod.http.get("/openapi.json")).json()
    components = spec["components"]["schemas"]
    assert "HTTPValidationError" not in components and "ValidationError" not in components
    for method, path, op in operations(spec):
        assert "422" not in op["responses"], (method, path)
        if op.get("parameters") or op.get("requestBody"):
            error = op["responses"].get("400", {})
            ref = error.get("content", {}).get("application/json", {}).get("schema", {})
            assert ref == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, error)
    info = components["ErrorInfo"]["properties"]
    assert {"code", "message", "details"} <= set(info)


async def test_every_mock_option_is_documented(pod: Pod) -> None:
    spec = (await pod.http.get("/openapi.json")).json()
    doc = spec["components"]["schemas"]["RunCreate"]["properties"]["model_options"]["description"]
    missing = [name for name in sorted(MOCK_OPTIONS) if f"`{name}`" not in doc]
    assert not missing, doc


async def test_real_answers_match_the_document(pod: Pod) -> None:
    """Each answer's status is documented for its route and its body fits that response's
    schema: successes, idempotent repeats, every kind of refusal."""
    import schemathesis

    spec = (await pod.http.get("/openapi.json")).json()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schemathesis' own deprecations, not ours
        schema = schemathesis.openapi.from_dict(spec)
    thread, empty = unique(), unique()
    key = {"Idempotency-Key": f"k-{thread}"}
    run = (
        await pod.http.post(
            f"/threads/{thread}/runs", json={"input": "hi", "model_options": {"chunks": 2}}
        )
    ).json()["run_id"]
    await pod.client.reply(thread)
    json_ = {"content-type": "application/json"}
    calls: list[tuple[str, str, str, dict[str, Any], int]] = [
        ("POST", "/threads/{thread_id}/runs", f"/threads/{thread}/runs",
         {"json": {"input": "x", "model_options": {"chunks": 1}}, "headers": key}, 202),
        ("POST", "/threads/{thread_id}/runs", f"/threads/{thread}/runs",
         {"json": {"input": "x", "model_options": {"chunks": 1}}, "headers": key}, 200),
        ("POST", "/threads/{thread_id}/runs", f"/threads/{thread}/runs",
         {"json": {"input": ""}}, 400),
        ("POST", "/threads/{thread_id}/runs", f"/threads/{thread}/runs",
         {"json": {"input": "x", "model_options": {"chunks": -1}}}, 400),
        ("POST", "/threads/{thread_id}/runs", f"/threads/{thread}/runs",
         {"json": {"input": "x", "surprise": 1}}, 400),
        ("POST", "/threads/{thread_id}/runs", f"/threads/{thread}/runs",
         {"content": b"{nope", "headers": json_}, 400),
        ("POST", "/threads/{thread_id}/runs", f"/threads/{thread}/runs",
         {"content": b'{"input": "x"}'}, 400),
        ("POST", "/threads/{thread_id}/runs", "/threads/a.b/runs", {"json": {"input": "x"}}, 400),
        ("GET", "/threads/{thread_id}/runs", f"/threads/{thread}/runs", {}, 200),
        ("GET", "/threads/{thread_id}/runs", f"/threads/{thread}/runs",
         {"params": {"limit": 0}}, 400),
        ("GET", "/threads/{thread_id}/runs", f"/threads/{empty}/runs", {}, 200),
        ("GET", "/threads/{thread_id}/runs/{run_id}", f"/threads/{thread}/runs/{run}", {}, 200),
        ("GET", "/threads/{thread_id}/runs/{run_id}", f"/threads/{thread}/runs/nope", {}, 404),
        ("POST", "/threads/{thread_id}/runs/{run_id}/cancel",
         f"/threads/{thread}/runs/{run}/cancel", {}, 409),
        ("POST", "/threads/{thread_id}/runs/{run_id}/cancel",
         f"/threads/{thread}/runs/{run}/cancel", {"params": {"timeout": -1}}, 400),
        ("GET", "/threads/{thread_id}/messages", f"/threads/{thread}/messages", {}, 200),
        ("GET", "/threads/{thread_id}/messages", "/threads/a*b/messages", {}, 400),
        ("GET", "/threads/{thread_id}/attach", f"/threads/{empty}/attach",
         {"params": {"wait": "false"}}, 204),
        ("POST", "/ai-sdk/chat", "/ai-sdk/chat", {"json": {"id": thread}}, 400),
        ("GET", "/healthz", "/healthz", {}, 200),
        ("GET", "/readyz", "/readyz", {}, 200),
    ]  # fmt: skip
    seen: list[str] = []
    for method, template, path, kwargs, expected in calls:
        resp = await pod.http.request(method, path, **kwargs)
        assert resp.status_code == expected, (method, path, resp.text)
        operation = schema[template][method]
        documented = operation.definition.raw["responses"]
        assert str(resp.status_code) in documented, (method, template, resp.status_code)
        # Raises with the schema and the value when the body does not fit.
        operation.validate_response(resp)
        seen.append(f"{method} {template} {resp.status_code}")
    assert len(seen) == len(calls)


@pytest.mark.parametrize(
    ("body", "params", "field", "rule"),
    [
        ({"input": ""}, {}, "input", "at least 1 character"),
        ({"input": "   "}, {}, "input", "must not be blank"),
        ({}, {}, "input", "Field required"),
        ({"input": "x", "surprise": 1}, {}, "surprise", "Extra inputs are not permitted"),
        ({"input": "x", "multitask_strategy": "later"}, {}, "multitask_strategy", "'enqueue'"),
        ({"input": "x", "timeout_s": 0}, {}, "timeout_s", "greater than 0"),
        ({"input": "x", "model_options": {"chunks": -1}}, {}, "model_options", "chunks must be"),
        (None, {"limit": 0}, "limit (query parameter)", "greater than or equal to 1"),
    ],
)
async def test_a_400_names_the_field_and_the_rule(
    pod: Pod, body: dict[str, Any] | None, params: dict[str, Any], field: str, rule: str
) -> None:
    thread = unique()
    if body is None:
        resp = await pod.http.get(f"/threads/{thread}/runs", params=params)
    else:
        resp = await pod.http.post(f"/threads/{thread}/runs", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"{field}: "), error
    assert rule in error["message"], error
    if "problems" in error.get("details", {}):
        (problem,) = error["details"]["problems"]
        assert problem["field"] == field and problem["rule"], problem


async def test_an_unknown_route_names_itself(pod: Pod) -> None:
    resp = await pod.http.post("/threads//runs", json={"input": "x"})
    assert resp.status_code == 404
    assert resp.json()["error"] == {"code": "not_found", "message": "no route: POST /threads//runs"}
