"""A real `threadgate serve` in production mode: auth is on by default, and secrets stay secret.

A subprocess (DBOS allows one app per process, and the session's pod runs with auth off) on
the session's stack, with its own database, stream and subject prefix. Its settings carry
recognizable secrets; neither its log, nor /metrics, nor any error body may show them.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from threadgate.client import AsyncClient
from threadgate.devstack import free_port
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unique
from tests.multipod.cluster import Pod, pod_env, unique_names

pytestmark = pytest.mark.integration

DB_PASSWORD = "db-pw-7Q2xZr"
NATS_PASSWORD = "nats-pw-K9vLm3"
MODEL_KEY = "sk-model-Y4tPq8"
JWT_SECRET = "jwt-secret-of-32-bytes-or-more-V6nB"
ALICE_KEY = "alice-key-Hs5Wd1"
BOB_KEY = "bob-key-Ue3Jc7"
SECRETS = (DB_PASSWORD, NATS_PASSWORD, MODEL_KEY, JWT_SECRET, ALICE_KEY, BOB_KEY)


def with_password(url: str, password: str) -> str:
    # The test server trusts local connections: the password is carried, never checked.
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@", 1)


@pytest.fixture
async def production_pod(stack: Stack, tmp_path: Path) -> AsyncIterator[Pod]:
    stream, prefix = unique_names()
    bob_digest = hashlib.sha256(BOB_KEY.encode()).hexdigest()
    env = pod_env(
        database_url=with_password(stack.new_database("auth"), DB_PASSWORD),
        nats_url=stack.nats.url,
        stream=stream,
        prefix=prefix,
        env="production",  # auth=auto: on
        api_keys=f"alice:{ALICE_KEY},bob:sha256:{bob_digest}",
        admin_principals="root",
        jwt_secret=JWT_SECRET,
        nats_user="threadgate",
        nats_password=NATS_PASSWORD,
        openai_api_key=MODEL_KEY,
        log_level="DEBUG",
    )
    pod = Pod(unique("auth"), free_port(), env, tmp_path / "pod.log")
    pod.spawn()
    await pod.wait_ready()
    try:
        yield pod
    finally:
        if pod.alive:
            await pod.term(30)


async def test_production_pod_requires_a_token(production_pod: Pod) -> None:
    pod = production_pod
    thread = unique()
    bodies: list[str] = []
    async with httpx.AsyncClient(base_url=pod.url, timeout=30) as http:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/"):
            resp = await http.get(path)
            assert resp.status_code == 200, path
            bodies.append(resp.text)
        denied = await http.post(f"/threads/{thread}/runs", json={"input": "hi"})
        assert denied.status_code == 401
        assert denied.headers["www-authenticate"] == "Bearer"
        bodies.append(denied.text)
        bodies.append((await http.get(f"/threads/{thread}/attach")).text)
    async with AsyncClient(pod.url, token=ALICE_KEY) as alice:
        run = await alice.post(thread, "hi", model_options={"chunks": 3})
        # EventSource style: the token in the query string of attach.
        async with (
            httpx.AsyncClient(base_url=pod.url, timeout=30) as http,
            http.stream(
                "GET", f"/threads/{thread}/attach", params={"access_token": ALICE_KEY}
            ) as resp,
        ):
            assert resp.status_code == 200
            text = (await resp.aread()).decode()
        assert "event: done" in text and run["run_id"] in text
        assert (await alice.reply(thread)).text == mock_reply(3)
    async with httpx.AsyncClient(base_url=pod.url, timeout=30) as http:
        bob = {"Authorization": f"Bearer {BOB_KEY}"}  # configured by its sha256 only
        for path in (f"/threads/{thread}/attach", f"/threads/{thread}/messages"):
            resp = await http.get(path, headers=bob)
            assert resp.status_code == 404, path
            bodies.append(resp.text)
        own = await http.post(
            f"/threads/{unique()}/runs",
            json={"input": "mine", "model_options": {"chunks": 1}},
            headers=bob,
        )
        assert own.status_code == 202
        too_big = await http.post(
            f"/threads/{thread}/runs",
            content=b"x" * (512 * 1024),
            headers={**bob, "content-type": "application/json"},
        )
        assert too_big.status_code == 413
        bodies.append(too_big.text)
        bodies.append((await http.get("/metrics")).text)
    for body in bodies:
        for secret in SECRETS:
            assert secret not in body
    # The whole log of the pod, DEBUG included: start-up, DBOS, requests, runs.
    log = pod.log_text()
    assert "pod started" in log
    for secret in SECRETS:
        assert secret not in log, secret


def test_production_without_credentials_refuses_to_start(stack: Stack) -> None:
    stream, prefix = unique_names()
    env = pod_env(
        database_url=stack.new_database("auth"),
        nats_url=stack.nats.url,
        stream=stream,
        prefix=prefix,
        env="production",
    )
    env["POD_NAME"] = unique("auth")
    env["THREADGATE_PORT"] = str(free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "threadgate.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no credential is configured" in proc.stderr
    assert "THREADGATE_AUTH=off" in proc.stderr
