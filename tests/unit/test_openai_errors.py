"""Provider errors: clients get a status and a code; the log gets the body, without the key."""

from __future__ import annotations

import logging

import pytest
from threadgate.errors import PermanentModelError, TransientModelError
from threadgate.models.openai import classify_status

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
