"""Secrets held by Settings never print: repr, str, JSON dumps, and what errors say."""

from __future__ import annotations

import pytest
from threadgate.errors import Unauthorized
from threadgate.settings import load_settings

pytestmark = pytest.mark.unit

SECRETS = {
    "database_url": "postgresql://u:db-pw-3kd9@db/x",
    "nats_password": "nats-pw-8fj2",
    "nats_token": "nats-token-1qz7",
    "openai_api_key": "sk-model-5bn4",
    "jwt_secret": "jwt-secret-of-at-least-32-bytes-7hy3",
    "api_keys": "alice:alice-key-2mx8",
}
NEEDLES = ("db-pw-3kd9", "nats-pw-8fj2", "nats-token-1qz7", "sk-model-5bn4", "7hy3", "2mx8")


def test_settings_never_show_secrets() -> None:
    s = load_settings(auth="on", nats_user="tg", **SECRETS)
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        for needle in NEEDLES:
            assert needle not in text, (needle, text[:200])
    # They are still there for the code that needs them.
    assert s.database_url.get_secret_value() == SECRETS["database_url"]
    assert s.api_key_digests  # keys are kept as digests only


def test_unauthorized_body_says_nothing_more() -> None:
    body = Unauthorized("a valid bearer token is required").body()
    assert body == {
        "error": {"code": "unauthorized", "message": "a valid bearer token is required"}
    }
