"""An in-process pod (uvicorn on a free port, on the test loop) over the real stack."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from threadgate.client import AsyncClient
from threadgate.devstack import free_port
from threadgate.main import Runtime, create_app
from threadgate.settings import Settings, load_settings

from tests.conftest import Stack

pytestmark = pytest.mark.integration


@dataclass
class Pod:
    url: str
    settings: Settings
    runtime: Runtime
    http: httpx.AsyncClient
    client: AsyncClient


@pytest.fixture(scope="session")
async def pod(stack: Stack) -> AsyncIterator[Pod]:
    port = free_port()
    settings = load_settings(
        pod_name="itest-0",
        port=port,
        host="127.0.0.1",
        database_url=stack.new_database("itest"),
        nats_url=stack.nats.url,
        stream_name="ITEST",
        stream_max_bytes=64 * 1024**2,  # reserved up front on the shared server (a CI disk)
        subject_prefix="itest",
        mock_delay_ms=5,
        keepalive_s=1.0,
        retry_base_s=0.05,
        retry_cap_s=0.2,
        max_retries=3,
        tail_linger_s=1.0,
        coalesce_ms=0,  # one part per mock chunk, as the suite counts them (no merging)
    )
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        # Ready when /readyz says so (DBOS launched and its queue worker running).
        for _ in range(600):
            if task.done():
                task.result()
                raise RuntimeError("pod exited during start-up")
            try:
                if (await http.get("/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)  # paces polling /readyz, the readiness signal
        else:
            raise TimeoutError("pod not ready")
        async with AsyncClient(url) as client:
            yield Pod(url, settings, app.state.runtime, http, client)
    server.should_exit = True
    await task
