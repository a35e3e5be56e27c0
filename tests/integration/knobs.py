"""Turning a running pod's knobs for one test: auth, limits (the app reads them per request).

DBOS allows one app per process, so auth and limit tests do not start a second pod: they swap
the settings of the session's pod (the API's and the runner's) and put them back afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import jwt
from threadgate.settings import Settings, load_settings

from tests.integration.conftest import Pod

JWT_SECRET = "itest-jwt-secret-that-is-long-enough-for-hs256"
JWT_AUDIENCE = "threadgate-itest"
JWT_ISSUER = "https://issuer.itest"
KEYS = {"alice": "alice-key-5f1d0c", "bob": "bob-key-9a7e21", "root": "root-key-c04b3e"}
AUTH_ON: dict[str, Any] = {
    "auth": "on",
    "api_keys": ",".join(f"{name}:{key}" for name, key in KEYS.items()),
    "admin_principals": "root",
    "jwt_secret": JWT_SECRET,
    "jwt_audience": JWT_AUDIENCE,
    "jwt_issuer": JWT_ISSUER,
}


@contextlib.contextmanager
def pod_settings(pod: Pod, **changes: Any) -> Iterator[Settings]:
    rt = pod.runtime
    before = rt.settings
    runner_before = rt.runner.settings if rt.runner is not None else None
    changed = load_settings(**{**before.model_dump(), **changes})
    rt.settings = changed
    if rt.runner is not None:
        rt.runner.settings = changed
    try:
        yield changed
    finally:
        rt.settings = before
        if rt.runner is not None and runner_before is not None:
            rt.runner.settings = runner_before


def key(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def jwt_token(sub: str, *, ttl: float = 60, **claims: Any) -> str:
    payload = {
        "sub": sub,
        "aud": JWT_AUDIENCE,
        "iss": JWT_ISSUER,
        "exp": int(time.time() + ttl),
        **claims,
    }
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
