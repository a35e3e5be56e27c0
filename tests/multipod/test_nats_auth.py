"""A NATS that requires credentials (docs/security.md, "NATS"), as the manifests and compose
now run it: the pod logs in with THREADGATE_NATS_USER/PASSWORD and works; a client without
them can neither publish a stop on the control subject nor write into a reply's subject.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from threadgate.client import AsyncClient
from threadgate.devstack import NatsServer, free_port
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unique
from tests.multipod.cluster import Pod, pod_env, unique_names, wait_run

pytestmark = pytest.mark.multipod

USER, PASSWORD = "threadgate", "nats-pw-Rt8sLq"


async def _quiet(exc: Exception) -> None:
    """nats-py's error callback (the refusal is raised by connect itself)."""


@pytest.fixture
def locked_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", args=["--user", USER, "--pass", PASSWORD])
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_pod_on_a_nats_that_requires_credentials(
    stack: Stack, locked_nats: NatsServer, tmp_path: Path
) -> None:
    stream, prefix = unique_names()
    env = pod_env(
        database_url=stack.new_database("natsauth"),
        nats_url=locked_nats.url,
        stream=stream,
        prefix=prefix,
        nats_user=USER,
        nats_password=PASSWORD,
    )
    pod = Pod("threadgate-0", free_port(), env, tmp_path / "pod.log")
    pod.spawn()
    try:
        await pod.wait_ready()
        async with AsyncClient(pod.url) as client:
            thread = unique()
            run = await client.post(thread, "hi", model_options={"chunks": 40, "delay_ms": 20})
            # Without credentials nobody reaches the subjects: no forged stop, no forged event.
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                nc = await nats.connect(
                    locked_nats.url, allow_reconnect=False, connect_timeout=2, error_cb=_quiet
                )
                await nc.publish(
                    f"{prefix}.control",
                    json.dumps({"stop": run["run_id"], "reason": "cancelled"}).encode(),
                )
            reply = await client.reply(thread)
            assert reply.text == mock_reply(40) and reply.status == "success"
            assert (await wait_run(client, thread, run["run_id"]))["status"] == "success"
    finally:
        if pod.alive:
            await pod.kill()

    # The same pod without the password never becomes ready, and its log says why.
    bare = {k: v for k, v in env.items() if k != "THREADGATE_NATS_PASSWORD"}
    refused = Pod("threadgate-1", free_port(), bare, tmp_path / "refused.log")
    refused.spawn()
    try:
        async with asyncio.timeout(60):
            while "Authorization Violation" not in refused.log_text():
                assert refused.alive, refused.log_tail()
                await asyncio.sleep(0.1)  # paces reading the log
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.TransportError):  # start-up never finished
                await http.get(f"{refused.url}/readyz")
    finally:
        await refused.kill()
