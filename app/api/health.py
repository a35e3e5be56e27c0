"""Health, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from ..workflows.thread_run import QUEUE_NAME
from .deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(rt: RuntimeDep) -> JSONResponse:
    """Ready: DBOS launched with its queue worker, Postgres and NATS reachable, not draining."""
    checks = {
        "dbos": rt.launched and rt.queue_worker_alive(),
        "postgres": await rt.db.ping(),
        "nats": rt.buffer is not None and await rt.buffer.ping(),
        "claim": rt.claim.held,
        "accepting": not rt.draining,
    }
    ready = all(checks.values())
    return JSONResponse(
        {
            "status": "ready" if ready else "not_ready",
            "pod": rt.settings.pod_name,
            "checks": checks,
        },
        status_code=200 if ready else 503,
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(rt: RuntimeDep) -> Response:
    """Prometheus text format."""
    if rt.launched:
        await rt.metrics.sample_queue_depth(rt.db, QUEUE_NAME)
    return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
