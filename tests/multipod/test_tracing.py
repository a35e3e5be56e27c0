"""One trace across pods: the POST on one pod, the run executed by another, exported over
OTLP/HTTP to a receiver in the test process (real `threadgate serve` processes, the SDK's own
exporter; the receiver decodes the protobuf requests as a collector would)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from threadgate.devstack import free_port

from tests.conftest import unique
from tests.multipod.cluster import wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod


@dataclass
class Received:
    spans: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        {
                            "name": s.name,
                            "trace": s.trace_id.hex(),
                            "id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(),
                            "pod": resource.get("service.instance.id"),
                            "attrs": {a.key: a.value for a in s.attributes},
                        }
                    )
        self.changed.set()

    async def until(self, pred: Any, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[str, Received]]:
    received = Received()
    app = FastAPI()

    @app.post("/v1/traces")
    async def traces(request: Request) -> Response:
        received.add(await request.body())
        return Response(content=b"", media_type="application/x-protobuf")

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn has a flag, no event
        await asyncio.sleep(0.01)  # paces polling uvicorn's started flag
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.should_exit = True
        await task


async def test_one_trace_across_pods(start_cluster: StartCluster) -> None:
    async with otlp_receiver() as (endpoint, received):
        quick = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # export within 0.1 s (the SDK reads it)
        # The accepting pod never starts a run itself (no fast start, its safety-net sweep
        # and DBOS's poll a minute away): the other pod's sweep (every 0.3 s) takes it.
        slow = {"THREADGATE_QUEUE_POLLING_S": "60", "THREADGATE_BACKGROUND_POLLING_S": "60"}
        cluster = await start_cluster(
            size=2,
            otel_endpoint=endpoint,
            per_pod={
                0: {"THREADGATE_FAST_START": "false", **slow, **quick},
                1: {"THREADGATE_QUEUE_POLLING_S": "0.3", **quick},
            },
        )
        accepting, executing = cluster.pods
        thread = unique("xpod")
        async with cluster.client([accepting]) as client:
            run_id = (await client.post(thread, "across", model_options={"chunks": 4}))["run_id"]
            run = await wait_run(client, thread, run_id)
        assert (run["status"], run["executor"]) == ("success", executing.name)

        def post() -> dict[str, Any] | None:
            return next(
                (
                    s
                    for s in received.spans
                    if s["name"] == "POST /threads/{thread_id}/runs"
                    and s["attrs"].get("threadgate.run_id", None) is not None
                    and s["attrs"]["threadgate.run_id"].string_value == run_id
                ),
                None,
            )

        def complete() -> bool:
            p = post()
            names = {s["name"] for s in received.spans if p and s["trace"] == p["trace"]}
            return names >= {"run.attempt", "run.done", "run.first_chunk", "run.claim"}

        await received.until(complete)
        root = post()
        assert root is not None
        trace = [s for s in received.spans if s["trace"] == root["trace"]]
        pods = {s["name"]: s["pod"] for s in trace}
        assert pods["POST /threads/{thread_id}/runs"] == accepting.name
        assert pods["run.enqueue"] == accepting.name
        for name in ("run.claim", "run.attempt", "run.first_chunk", "run.done"):
            assert pods[name] == executing.name, name
        ids = {s["name"]: s for s in trace}
        assert ids["run.attempt"]["parent"] == root["id"]  # the executing pod continues the POST
        assert ids["run.done"]["parent"] == ids["run.attempt"]["id"]
