"""Provider errors: clients get a status and a code; the log gets the body, without the key."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from threadgate.errors import PermanentModelError, TransientModelError
from threadgate.logs import Redacting, redact
from threadgate.models.openai import _deltas, classify_status

pytestmark = pytest.mark.unit


def test_a_provider_body_reaches_the_log_only_and_never_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = '{"error": "bad request", "echo": {"authorization": "Bearer sk-operator-123"}}'
    with caplog.at_level(logging.WARNING, logger="threadgate.models.openai"):
        err = classify_status(400, body, "sk-operator-123")
    assert isinstance(err, PermanentModelError)
    assert err.message == "model provider answered 400"  # what the run's error says
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "bad request" in logged and "sk-operator-123" not in logged and "***" in logged
    assert isinstance(classify_status(503, body, "sk-operator-123"), TransientModelError)


def test_the_key_is_masked_before_the_body_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    # The key straddles the 300th character: cut first, then masked, its start would remain.
    key = "sk-operator-0123456789abcdef"
    body = "x" * 290 + key
    with caplog.at_level(logging.WARNING, logger="threadgate.models.openai"):
        classify_status(400, body, key)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "sk-op" not in logged and logged.endswith("***")


@pytest.mark.parametrize(
    "echoed",
    [
        "{'authorization': 'Bearer abc.def-123', 'host': 'x'}",  # a Python dict's repr
        '{"Authorization": "Bearer abc.def-123"}',  # JSON
        "authorization: Bearer abc.def-123\r\nhost: x",  # header lines
        '{"x-api-key": "abc.def-123"}',
        "api_key=abc.def-123&model=m",
    ],
)
def test_redact_masks_credentials_it_does_not_know(echoed: str) -> None:
    # Not the pod's own key: a provider may echo a gateway's, or a proxy's.
    assert "abc.def-123" not in redact(echoed)
    assert "***" in redact(echoed)


async def test_an_error_event_is_logged_masked(caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-operator-0123456789abcdef"
    event = {"error": {"message": "boom", "headers": {"authorization": f"Bearer {key}"}}}
    lines = f"data: {json.dumps(event)}\n\n"
    resp = httpx.Response(200, content=lines.encode())
    with (
        caplog.at_level(logging.WARNING, logger="threadgate.models.openai"),
        pytest.raises(PermanentModelError),
    ):
        async for _ in _deltas(resp, key):
            pass
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "boom" in logged and "sk-op" not in logged and "'authorization': '***'" in logged


def test_the_log_handler_masks_the_pods_own_secrets() -> None:
    formatter = Redacting(logging.Formatter("%(message)s %(extra_field)s"), ["hunter2-secret"])
    record = logging.makeLogRecord(
        {"msg": "said %s", "args": ("hunter2-secret",), "extra_field": "x hunter2-secret"}
    )
    assert formatter.format(record) == "said *** x ***"
