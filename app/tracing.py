"""OpenTelemetry traces of a run, one trace across pods: accept, queue, claim, attempts, done.

Off unless an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or THREADGATE_OTEL_ENDPOINT):
then the SDK is not even imported, and every hook below returns on its first line (the hot
path — one `chunk()` call per published part — costs a function call).

On, one trace per run:

    POST /threads/{thread_id}/runs      the accepting pod (continues a client's traceparent)
      run.enqueue                       insert + enqueue, under the thread's lock
      run.queued                        enqueued → claimed (DBOS's timestamps)   } the pod
      run.claim                         claimed → the reply step begins          } that
      run.attempt                       one per attempt (n, kind, executor)      } executes
        run.first_chunk                 attempt start → its first part published } the run
        run.done                        reply stored, `done` published (status)  }

The POST span's context crosses pods through the database: the accepting pod writes its
traceparent into threadgate.run_traces before it enqueues, the executing pod reads it when an
attempt begins (one row, on tracing pods only). A pod that dies takes its unended spans along.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg import AsyncConnection

    from .settings import Settings
    from .store.db import Database
    from .store.runs import Run

logger = logging.getLogger(__name__)

MAX_RUNS = 10_000  # runs whose spans this pod keeps open at once (a bound, not a target)

TRACE_SQL = """
SELECT t.traceparent, w.created_at, w.started_at_epoch_ms
FROM threadgate.run_traces t
LEFT JOIN dbos.workflow_status w ON w.workflow_uuid = t.run_id
WHERE t.run_id = %s
"""
REMEMBER_SQL = """
INSERT INTO threadgate.run_traces (run_id, traceparent) VALUES (%s, %s)
ON CONFLICT (run_id) DO NOTHING
"""


@dataclass
class _RunSpans:
    parent: Any  # the POST span's context
    attempt: Any  # the current attempt's span
    began_ns: int
    first_chunk: bool = False
    done: Any = None


class Tracing:
    """The pod's tracer and the spans of the runs it executes now."""

    def __init__(self, provider: Any, pod: str) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("threadgate")
        self.pod = pod
        self.propagator = TraceContextTextMapPropagator()
        self.runs: OrderedDict[str, _RunSpans] = OrderedDict()

    def keep(self, run_id: str, spans: _RunSpans) -> None:
        self.runs[run_id] = spans
        self.runs.move_to_end(run_id)
        while len(self.runs) > MAX_RUNS:
            _, old = self.runs.popitem(last=False)
            old.attempt.end()


_tracing: Tracing | None = None
_post: contextvars.ContextVar[Any] = contextvars.ContextVar("threadgate_post_span", default=None)


def configure(settings: Settings, exporter: Any = None) -> Tracing | None:
    """Turn tracing on when an endpoint is set (or `exporter` is given: tests), else off."""
    global _tracing
    shutdown()
    if not settings.otel_endpoint and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is defined: traces go to /v1/traces.
        exporter = OTLPSpanExporter(endpoint=settings.otel_endpoint.rstrip("/") + "/v1/traces")
    resource = Resource.create(
        {
            "service.name": settings.otel_service_name,
            "service.instance.id": settings.pod_name,
            "service.version": settings.app_version,
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _tracing = Tracing(provider, settings.pod_name)
    logger.info("tracing on: OTLP to %s", settings.otel_endpoint or type(exporter).__name__)
    return _tracing


def shutdown() -> None:
    """Flush what is buffered and turn tracing off."""
    global _tracing
    t, _tracing = _tracing, None
    if t is not None:
        for spans in t.runs.values():
            spans.attempt.end()
        with contextlib.suppress(Exception):
            t.provider.shutdown()


_OFF = contextlib.nullcontext()


def accepting(thread_id: str, headers: Mapping[str, str]) -> contextlib.AbstractContextManager[Any]:
    """Around a POST that accepts a run: its span (continuing the client's traceparent, if
    any) and the enqueue's."""
    t = _tracing
    return _OFF if t is None else _accepting(t, thread_id, headers)


@contextlib.contextmanager
def _accepting(t: Tracing, thread_id: str, headers: Mapping[str, str]) -> Iterator[None]:
    from opentelemetry.trace import SpanKind

    ctx = t.propagator.extract(dict(headers))
    with t.tracer.start_as_current_span(
        "POST /threads/{thread_id}/runs",
        context=ctx,
        kind=SpanKind.SERVER,
        attributes={"threadgate.thread_id": thread_id, "threadgate.pod": t.pod},
    ) as post:
        token = _post.set(post)
        try:
            with t.tracer.start_as_current_span("run.enqueue"):
                yield
        finally:
            _post.reset(token)


async def accepted(conn: AsyncConnection[Any], run_id: str) -> None:
    """A new run, before it is enqueued: its trace context goes where any pod can read it."""
    t = _tracing
    if t is None or (post := _post.get()) is None:
        return
    from opentelemetry.trace import set_span_in_context

    post.set_attribute("threadgate.run_id", run_id)
    carrier: dict[str, str] = {}
    t.propagator.inject(carrier, context=set_span_in_context(post))
    await conn.execute(REMEMBER_SQL, (run_id, carrier.get("traceparent")))


async def attempt_began(db: Database, run: Run, replayed: bool) -> None:
    """An attempt of the reply step began on this pod (after its row was counted)."""
    t = _tracing
    if t is None:
        return
    try:
        await _attempt_began(t, db, run, replayed)
    except Exception as exc:  # tracing never fails a run
        logger.debug("tracing an attempt failed: %r", exc)


async def _attempt_began(t: Tracing, db: Database, run: Run, replayed: bool) -> None:
    now = time.time_ns()
    known = t.runs.pop(run.run_id, None)
    if known is not None:  # a retry in this process: the previous attempt ends here
        known.attempt.end(end_time=now)
        parent = known.parent
    else:
        async with db.pool.connection() as conn:
            cur = await conn.execute(TRACE_SQL, (run.run_id,))
            row = await cur.fetchone()
        if row is None or not row["traceparent"]:
            return  # accepted by a pod that did not trace
        parent = t.propagator.extract({"traceparent": row["traceparent"]})
        enqueued, claimed = row["created_at"], row["started_at_epoch_ms"]
        if run.attempt == 1 and enqueued and claimed:
            ms = 1_000_000
            t.tracer.start_span("run.queued", context=parent, start_time=enqueued * ms).end(
                end_time=claimed * ms
            )
            t.tracer.start_span(
                "run.claim",
                context=parent,
                start_time=claimed * ms,
                attributes={"threadgate.executor": t.pod},
            ).end(end_time=max(now, claimed * ms))
    kind = "first" if run.attempt == 1 else "replay" if replayed else "retry"
    span = t.tracer.start_span(
        "run.attempt",
        context=parent,
        start_time=now,
        attributes={
            "threadgate.run_id": run.run_id,
            "threadgate.thread_id": run.thread_id,
            "threadgate.attempt": run.attempt,
            "threadgate.attempt_kind": kind,
            "threadgate.executor": t.pod,
        },
    )
    t.keep(run.run_id, _RunSpans(parent=parent, attempt=span, began_ns=now))


def chunk(run_id: str) -> None:
    """A part of the reply was published (the first of an attempt gets its span)."""
    t = _tracing
    if t is None:
        return
    spans = t.runs.get(run_id)
    if spans is None or spans.first_chunk:
        return
    spans.first_chunk = True
    from opentelemetry.trace import set_span_in_context

    t.tracer.start_span(
        "run.first_chunk",
        context=set_span_in_context(spans.attempt),
        start_time=spans.began_ns,
    ).end()


def finishing(run_id: str) -> None:
    """The run's final step began: storing the reply, then publishing `done`."""
    t = _tracing
    if t is None or (spans := t.runs.get(run_id)) is None:
        return
    from opentelemetry.trace import set_span_in_context

    spans.done = t.tracer.start_span("run.done", context=set_span_in_context(spans.attempt))


def finished(run_id: str, status: str) -> None:
    """`done` is published: the run's spans on this pod end."""
    t = _tracing
    if t is None or (spans := t.runs.pop(run_id, None)) is None:
        return
    for span in (spans.done, spans.attempt):
        if span is not None:
            span.set_attribute("threadgate.status", status)
            span.end()
