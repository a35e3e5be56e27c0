"""Health, readiness and metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from ..readiness import DependencyCheck, check_all
from ..runtime import Runtime
from ..workflows.thread_run import QUEUE_NAME
from .deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(rt: RuntimeDep) -> JSONResponse:
    """Alive: the process answers, and once launched its queue worker thread runs (a dead
    worker never starts another run: only a restart mends it). Never touches PostgreSQL or NATS."""
    if rt.launched and not rt.draining and not rt.queue_worker_alive():
        return JSONResponse({"status": "queue_worker_dead"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(rt: RuntimeDep) -> JSONResponse:
    """Ready for traffic: DBOS launched with its queue worker, not draining.

    PostgreSQL, NATS and the executor claim are reported, not required: they are shared by
    every pod, so an outage would take every pod out of the Service at once (ingress 502s
    instead of this app's 503s, and a PDB that blocks every eviction). A pod that really lost
    its claim exits. `status` says `degraded` while a dependency is away.
    """
    serving = {"dbos": rt.launched and rt.queue_worker_alive(), "accepting": not rt.draining}
    # Concurrent and bounded: a frozen PostgreSQL or NATS costs THREADGATE_READINESS_CHECK_
    # TIMEOUT_S (1 s), well inside the probe's timeout, and reads `degraded`.
    deps = await check_all(_dependency_checks(rt), rt.settings.readiness_check_timeout_s)
    deps["claim"] = rt.claim.held
    ready = all(serving.values())
    status = "not_ready" if not ready else "ready" if all(deps.values()) else "degraded"
    return JSONResponse(
        {"status": status, "pod": rt.settings.pod_name, "checks": {**serving, **deps}},
        status_code=200 if ready else 503,
    )


def _dependency_checks(rt: Runtime) -> dict[str, DependencyCheck]:
    if not rt.dependency_checks:

        async def nats() -> bool:
            return rt.buffer is not None and await rt.buffer.ping()

        rt.dependency_checks["postgres"] = DependencyCheck("postgres", rt.db.ping)
        rt.dependency_checks["nats"] = DependencyCheck("nats", nats)
    return rt.dependency_checks


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(rt: RuntimeDep) -> Response:
    """Prometheus text format (404 here when THREADGATE_METRICS_PORT serves it instead)."""
    if rt.settings.metrics_port:
        return JSONResponse(
            {"error": {"code": "not_found", "message": "metrics are on the metrics port"}},
            status_code=404,
        )
    return await _render(rt)


async def _render(rt: Runtime) -> Response:
    if rt.launched:
        await rt.metrics.sample_queue_depth(rt.db, QUEUE_NAME)
    return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


class _QuietServer(uvicorn.Server):
    """A second server in the pod's loop: the API server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def metrics_server(rt: Runtime) -> uvicorn.Server:
    """GET /metrics on THREADGATE_METRICS_PORT (scraped in-cluster, never public), and the
    probes: a pod's supervisor (app/pod.py) asks each of its processes there."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    async def scrape() -> Response:
        return await _render(rt)

    async def alive() -> JSONResponse:
        return await healthz(rt)

    async def ready() -> JSONResponse:
        return await readyz(rt)

    app.add_api_route("/metrics", scrape, methods=["GET"])
    app.add_api_route("/healthz", alive, methods=["GET"])
    app.add_api_route("/readyz", ready, methods=["GET"])

    config = uvicorn.Config(
        app,
        host=rt.settings.metrics_host or rt.settings.host,
        port=rt.settings.metrics_port,
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    return _QuietServer(config)
