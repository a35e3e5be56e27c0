"""A run's OpenTelemetry trace, in-process: the SDK's in-memory exporter on the suite's pod.

Across two pods (the POST on one, the run on the other): tests/multipod/test_tracing.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from threadgate import tracing

from tests.conftest import unique
from tests.integration.conftest import Pod
from tests.multipod.cluster import wait_run

pytestmark = pytest.mark.integration

CHAIN = ["POST /threads/{thread_id}/runs", "run.enqueue", "run.queued", "run.claim"]


@pytest.fixture
def exporter(pod: Pod) -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure(pod.settings, exporter=memory)
    try:
        yield memory
    finally:
        tracing.shutdown()


def spans_of(exporter: InMemorySpanExporter, run_id: str) -> list[Any]:
    """Every finished span of the trace whose POST accepted `run_id`."""
    assert tracing._tracing is not None
    tracing._tracing.provider.force_flush()
    spans = list(exporter.get_finished_spans())
    (post,) = [
        s for s in spans if s.attributes.get("threadgate.run_id") == run_id and s.name == CHAIN[0]
    ]
    return [s for s in spans if s.context.trace_id == post.context.trace_id]


async def test_a_run_is_one_trace(pod: Pod, exporter: InMemorySpanExporter) -> None:
    thread = unique("trace")
    client_trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    accepted = await pod.client.http.post(
        f"{pod.url}/threads/{thread}/runs",
        json={"input": "traced", "model_options": {"chunks": 3}},
        headers={"traceparent": client_trace},
    )
    run_id = accepted.json()["run_id"]
    assert (await wait_run(pod.client, thread, run_id))["status"] == "success"

    spans = spans_of(exporter, run_id)
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {*CHAIN, "run.attempt", "run.first_chunk", "run.done"}
    post = by_name[CHAIN[0]]
    # The client's trace continues: same trace id, its span is the POST's parent.
    assert f"{post.context.trace_id:032x}" == client_trace.split("-")[1]
    assert f"{post.parent.span_id:016x}" == client_trace.split("-")[2]
    for name in ("run.enqueue", "run.queued", "run.claim", "run.attempt"):
        assert by_name[name].parent.span_id == post.context.span_id, name
    attempt = by_name["run.attempt"]
    for name in ("run.first_chunk", "run.done"):
        assert by_name[name].parent.span_id == attempt.context.span_id, name
    assert attempt.attributes["threadgate.attempt"] == 1
    assert attempt.attributes["threadgate.status"] == "success"
    assert by_name["run.done"].attributes["threadgate.status"] == "success"
    # In time order: queued, then claimed, then the attempt, its first chunk, done.
    assert by_name["run.queued"].end_time <= by_name["run.claim"].end_time
    assert by_name["run.claim"].start_time <= attempt.start_time
    assert by_name["run.first_chunk"].end_time <= by_name["run.done"].start_time


async def test_tracing_off_costs_no_row(pod: Pod) -> None:
    """Off (the default), nothing is written: no trace context for the run."""
    assert tracing._tracing is None
    thread = unique("untraced")
    run_id = (await pod.client.post(thread, "plain", model_options={"chunks": 1}))["run_id"]
    await wait_run(pod.client, thread, run_id)
    async with pod.runtime.db.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM threadgate.run_traces WHERE run_id = %s", (run_id,)
        )
        assert (await cur.fetchone())["n"] == 0  # type: ignore[index]
