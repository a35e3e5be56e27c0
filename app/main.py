"""create_app(): the FastAPI app of one pod and its lifespan (claim, DBOS launch, NATS, drain)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from dbos import DBOS, DBOSConfig
from fastapi import FastAPI

from . import __version__, tracing
from .identity import ExecutorClaim
from .logs import adopt_dbos_logger
from .metrics import Metrics
from .registry import load_source
from .retention import Retention
from .runtime import Runtime
from .settings import Settings
from .store.db import Database, dbos_url, tcp_options
from .store.runs import PgRunStore
from .streams.buffer import JetStreamBuffer, connect_nats
from .streams.hub import TailHub
from .workflows import thread_run as wf
from .workflows.adoption import Adoption, report_stranded
from .workflows.internals import (
    active_workflow_ids,
    check_queue,
    queue_row,
    quiet_background,
    quiet_queue_manager,
    reenqueue,
    stop_background_threads,
    wake_queue_manager,
)
from .workflows.runner import Runner, register_queue
from .workflows.stops import StopSignals

logger = logging.getLogger(__name__)


def dbos_config(settings: Settings) -> DBOSConfig:
    return DBOSConfig(
        name=settings.app_name,
        system_database_url=dbos_url(settings.database_url.get_secret_value()),
        application_version=settings.app_version,
        executor_id=settings.pod_name,
        log_level=settings.log_level.upper(),
        sys_db_pool_size=settings.dbos_pool_size,
        # No ping before every query DBOS makes (one more round trip and transaction each,
        # half of an idle pod's): a connection a database restart broke fails its query, is
        # dropped by SQLAlchemy, and DBOS retries the operation (its db_retry).
        # connect_args reach psycopg.connect as libpq parameters; they replace DBOS's own
        # connect_args, so its defaults (application name, connect timeout) are given here too.
        db_engine_kwargs={
            "pool_pre_ping": False,
            "connect_args": {
                "application_name": "dbos_transact",
                "connect_timeout": 10,
                **tcp_options(settings),
            },
        },
        scheduler_polling_interval_sec=settings.background_polling_s,  # we schedule nothing
    )


async def start(rt: Runtime) -> None:
    s = rt.settings
    if s.otel_endpoint:
        tracing.configure(s)
    await rt.db.open()
    await rt.db.migrate()
    # Fence before DBOS launches: launch recovers this executor's PENDING workflows.
    await rt.claim.acquire(s.claim_timeout_s)

    async def on_reconnect() -> None:
        if rt.hub is not None:  # not inside nats-py's reconnect task: resubscribing may wait
            rt.background.append(asyncio.create_task(rt.hub.resubscribe_all()))

    rt.nc = await connect_nats(s, "pod", on_reconnect)
    rt.buffer = JetStreamBuffer(s, rt.nc, on_republish=rt.metrics.republished)
    await rt.buffer.ensure_stream()
    rt.hub = TailHub(
        rt.buffer,
        linger_s=s.tail_linger_s,
        liveness=rt.alive,
        max_bytes=s.tail_max_bytes,
        max_lingering=s.max_attach_per_principal,
    )
    rt.runner = Runner(s, rt.store, rt.stops, rt.nc)
    await rt.runner.listen()
    wf.bind(
        wf.RunDeps(
            settings=s,
            store=rt.store,
            buffer=rt.buffer,
            model=rt.source,
            stops=rt.stops,
            metrics=rt.metrics,
            run_ended=rt.runner.run_ended,
            run_waits=rt.runner.run_waits,
        )
    )
    recovering = await recoverable_runs(rt)
    DBOS(config=dbos_config(s))
    adopt_dbos_logger()
    quiet_background(s.background_polling_s)
    quiet_queue_manager(s.background_polling_s)
    DBOS.launch()
    adopt_dbos_logger()
    rt.launched = True
    if recovering:
        rt.metrics.launch_recovered.inc(len(recovering))
        logger.warning(
            "recovering %d runs left by this pod's previous process: %s",
            len(recovering),
            " ".join(recovering),
            extra={"runs": recovering},
        )
    await register_queue(s)
    # The claim copies DBOS's predicate for this queue's configuration: read it once here,
    # not per claim (DBOS's worker reads it every poll).
    async with rt.db.pool.connection() as conn:
        check_queue(await queue_row(conn, wf.QUEUE_NAME))
    wake_queue_manager()  # DBOS's worker of the queue starts now, not at the next listing
    rt.adoption = Adoption(s, rt.db, rt.metrics, rt.buffer, started=rt.runner.start_soon)
    rt.runner.on_left = rt.adoption.move_queued
    await rt.adoption.heartbeat()  # this name's row says this version before the checks read it
    await rt.adoption.move_queued()
    await report_stranded(rt.adoption)
    # DBOS re-enqueues the runs it recovers in a thread of its own: do it here (the same
    # conditional step, so whichever comes first wins), then claim them at once.
    for run_id in recovering:
        await asyncio.to_thread(reenqueue, run_id, s.pod_name)
    rt.runner.start_soon()
    rt.background.append(asyncio.create_task(rt.adoption.run(), name="adoption"))
    retention = Retention(s, rt.db, rt.metrics)
    if retention.enabled:
        rt.background.append(asyncio.create_task(retention.run(), name="retention"))
    if s.fast_start:
        net = rt.runner.starts.safety_net()
        rt.background.append(asyncio.create_task(net, name="safety-net"))
    rt.metrics.attachers.set_function(lambda: rt.hub.attached if rt.hub else 0)
    rt.metrics.tails.set_function(lambda: len(rt.hub.tails) if rt.hub else 0)
    rt.metrics.inflight.set_function(lambda: _active_runs(rt))
    if s.metrics_port:
        from .api.health import metrics_server

        rt.metrics_server = metrics_server(rt)
        rt.background.append(asyncio.create_task(rt.metrics_server.serve(), name="metrics"))
    logger.info(
        "pod started",
        extra={"executor": s.pod_name, "version": s.app_version, "build": __version__},
    )


RECOVERABLE_SQL = """
SELECT workflow_uuid AS run_id FROM dbos.workflow_status
WHERE status = 'PENDING' AND executor_id = %s AND application_version = %s AND name = %s
ORDER BY created_at
"""


async def recoverable_runs(rt: Runtime) -> list[str]:
    """The runs DBOS launch will recover: PENDING under this pod's name and version.

    Read before launch, which re-enqueues them at once; we hold the name's claim, so nothing
    else changes them in between. DBOS itself logs only their number.
    """
    async with rt.db.pool.connection() as conn:
        cur = await conn.execute("SELECT to_regclass('dbos.workflow_status') IS NOT NULL AS ok")
        row = await cur.fetchone()
        if not (row and row["ok"]):
            return []  # first start on this database: DBOS has not created its tables yet
        s = rt.settings
        cur = await conn.execute(RECOVERABLE_SQL, (s.pod_name, s.app_version, wf.WORKFLOW_NAME))
        return [r["run_id"] for r in await cur.fetchall()]


def _active_runs(rt: Runtime) -> int:
    """Workflows executing in this process now (every workflow here is a thread run)."""
    if not rt.launched:
        return 0
    try:
        return len(active_workflow_ids())
    except Exception:  # a DBOS internal moved: the gauge reads 0 rather than break /metrics
        return 0


async def stop(rt: Runtime) -> None:
    rt.draining = True
    if rt.metrics_server is not None:
        rt.metrics_server.should_exit = True
    for task in rt.background:
        task.cancel()
    if rt.launched:
        await drain(rt)
        DBOS.destroy(destroy_registry=False)
        rt.launched = False
    wf.bind(None)
    if rt.stops.poller is not None:
        rt.stops.poller.close()
    if rt.runner is not None:
        await rt.runner.close()
    if rt.hub is not None:
        await rt.hub.close()
    if rt.adoption is not None:
        with contextlib.suppress(Exception):
            await rt.adoption.leave()
    await rt.claim.release()
    if rt.runner is not None:
        # This name is free now: pods of another version may take over its version's queued
        # runs if it was the last of it, and claim what it left startable.
        await rt.runner.kick(left=rt.settings.app_version)
    if rt.nc is not None:
        with contextlib.suppress(Exception):
            await rt.nc.drain()
    await rt.db.close()
    tracing.shutdown()
    logger.info("pod stopped")


async def begin_drain(rt: Runtime) -> None:
    """SIGTERM: /readyz turns 503 and POST answers 503 at once, then in-flight runs finish."""
    logger.info(
        "draining: no new runs; waiting up to %.0fs for in-flight runs", rt.settings.drain_timeout_s
    )
    rt.draining = True
    await drain(rt)


async def drain(rt: Runtime) -> None:
    """Stop claiming, then give this pod's runs up to `drain_timeout_s` to finish.

    What is still running after that stays PENDING and is recovered when the name returns.
    DBOS.destroy(workflow_completion_timeout_sec=...) would block the event loop the runs
    need, so we stop DBOS's background threads (queue workers included) and wait here.
    """
    if rt.runner is not None:
        rt.runner.draining = True
    stop_background_threads()
    loop = asyncio.get_running_loop()
    # SIGTERM drains, then uvicorn's shutdown calls stop(), which drains again: both share one
    # deadline, or the runs would get twice the timeout (past the pod's grace period).
    if rt.drain_deadline is None:
        rt.drain_deadline = loop.time() + rt.settings.drain_timeout_s
    deadline = rt.drain_deadline
    while (active := active_workflow_ids()) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if active:
        logger.warning(
            "drain timeout: %d runs left to recovery when %s returns",
            len(active),
            rt.settings.pod_name,
        )
        with contextlib.suppress(Exception):  # a hand-off, not a crash: no replay counted
            await rt.store.hand_off(active)
        await _abandon(wf.running_tasks())


async def _abandon(tasks: list[asyncio.Task[Any]], limit_s: float = 5.0) -> None:
    """Stop runs still going past the drain while NATS and Postgres are open: a cancelled DBOS
    workflow stays PENDING and is recovered when the name returns. Left to asyncio.run's final
    cancellation, a run could lose that single cancel and go on against closed connections
    (seen: still retrying its JetStream publish 30 s later, the process hung past its grace
    period). So cancel, and cancel again, until each one ends."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    if pending:
        logger.error("%d runs did not stop when cancelled", len(pending))


def create_app(settings: Settings) -> FastAPI:
    from .api import install

    url = settings.database_url.get_secret_value()
    tcp = tcp_options(settings)
    db = Database(
        url,
        max_size=settings.db_pool_size,
        timeout=settings.db_pool_timeout_s,
        connect_kwargs=tcp,
    )
    # The claim keeps keepalives but no tcp_user_timeout: a blip that cut its connection
    # while the server still holds the session's lock would make the pod exit (ClaimLost);
    # a dead server session is ended by the server's own keepalives.
    claim_tcp = {k: v for k, v in tcp.items() if k != "tcp_user_timeout"}
    rt = Runtime(
        settings=settings,
        db=db,
        store=PgRunStore(db),
        claim=ExecutorClaim(url, settings.pod_name, connect_kwargs=claim_tcp),
        metrics=Metrics(),
        stops=StopSignals(),
        source=load_source(settings),  # a plug-in that cannot load fails the start
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await start(rt)
        except BaseException:
            await stop(rt)
            raise
        try:
            yield
        finally:
            await stop(rt)

    app = FastAPI(
        title="threadgate",
        version=__version__,
        description="Durable chat runs: POST a message, attach to its reply over SSE.",
        lifespan=lifespan,
        docs_url=None,  # api/ui.py serves /docs from local assets (no CDN)
        redoc_url=None,
    )
    app.state.runtime = rt
    install(app)
    return app
