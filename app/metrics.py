"""Prometheus metrics of a pod: runs, attempts, recoveries, attachers, chunks, latency."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .store.db import Database

logger = logging.getLogger(__name__)

# Runs waiting in the DBOS queue (all pods share it), and how long the oldest has waited
# (DBOS's created_at: epoch milliseconds). Sampled when /metrics is scraped.
QUEUE_DEPTH_SQL = """
SELECT count(*) AS n,
       coalesce(extract(epoch FROM now()) - min(created_at) / 1000.0, 0)::float8 AS oldest_s
FROM dbos.workflow_status WHERE queue_name = %s AND status = 'ENQUEUED'
"""


class Metrics:
    """One registry per app, so several apps in one test process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs_accepted = Counter(
            "threadgate_runs_accepted_total", "Runs accepted by POST on this pod", registry=r
        )
        self.runs_finished = Counter(
            "threadgate_runs_finished_total", "Runs finished on this pod", ["status"], registry=r
        )
        self.attempts = Counter(
            "threadgate_run_attempts_total",
            "Attempts of the reply step begun on this pod: first, replay (after a crash, on any"
            " pod), retry (after a transient failure, in the same execution)",
            ["kind"],
            registry=r,
        )
        self.chunks = Counter(
            "threadgate_chunks_published_total", "Chunks published to JetStream", registry=r
        )
        self.publish_retries = Counter(
            "threadgate_publish_retries_total", "JetStream publishes sent again", registry=r
        )
        self.recovered = Counter(
            "threadgate_runs_recovered_total",
            "Runs resumed after a crash (replays begun on this pod)",
            registry=r,
        )
        self.launch_recovered = Counter(
            "threadgate_launch_recovered_runs_total",
            "PENDING runs of this pod's name and version found at start-up and re-enqueued",
            registry=r,
        )
        self.adopted = Counter(
            "threadgate_runs_adopted_total", "Runs adopted from departed executors", registry=r
        )
        self.first_chunk = Histogram(
            "threadgate_time_to_first_chunk_seconds",
            "Run accepted → first chunk published",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.attachers = Gauge(
            "threadgate_active_attachers", "SSE clients attached to this pod", registry=r
        )
        self.tails = Gauge(
            "threadgate_thread_tails", "JetStream tails open on this pod", registry=r
        )
        self.inflight = Gauge(
            "threadgate_runs_in_flight", "Runs executing on this pod now", registry=r
        )
        self.queue_depth = Gauge(
            "threadgate_queue_depth",
            "Runs waiting (ENQUEUED) in the thread_runs queue, all pods; sampled at scrape,"
            " NaN when the sample failed",
            registry=r,
        )
        self.queue_oldest = Gauge(
            "threadgate_queue_oldest_age_seconds",
            "How long the oldest ENQUEUED run of the thread_runs queue has waited, all pods;"
            " sampled at scrape, NaN when the sample failed",
            registry=r,
        )
        self.stranded = Gauge(
            "threadgate_stranded_runs",
            "PENDING runs under this pod's name with another application version",
            registry=r,
        )

        self.retention_deleted = Counter(
            "threadgate_retention_deleted_runs_total",
            "Finished runs deleted by retention on this pod: part=workflow (their DBOS"
            " workflow), part=conversation (their row and messages)",
            ["part"],
            registry=r,
        )
        self.retention_swept = Gauge(
            "threadgate_retention_last_sweep_timestamp_seconds",
            "When this pod last completed a retention sweep (0: never)",
            registry=r,
        )

        # Every labelled series exists from the first scrape: rate() and alerts see a 0, not a gap.
        for kind in ("first", "replay", "retry"):
            self.attempts.labels(kind=kind)
        for status in ("success", "error", "cancelled", "interrupted"):
            self.runs_finished.labels(status=status)
        for part in ("workflow", "conversation"):
            self.retention_deleted.labels(part=part)

    def attempt(self, n: int, *, retry: bool = False) -> None:
        """Attempt `n` began; `retry`: the same execution tries again after a transient error."""
        kind = "first" if n == 1 else "retry" if retry else "replay"
        self.attempts.labels(kind=kind).inc()
        if kind == "replay":
            self.recovered.inc()

    def chunk(self) -> None:
        self.chunks.inc()

    def finished(self, status: str) -> None:
        self.runs_finished.labels(status=status).inc()

    def republished(self, n: int) -> None:
        self.publish_retries.inc(n)

    async def sample_queue_depth(self, db: Database, queue: str, timeout_s: float = 0.5) -> None:
        """One cheap count, bounded so that a slow database never stalls a scrape."""
        try:
            async with asyncio.timeout(timeout_s), db.pool.connection() as conn:
                cur = await conn.execute(QUEUE_DEPTH_SQL, (queue,))
                row = await cur.fetchone()
            self.queue_depth.set(row["n"] if row else 0)
            self.queue_oldest.set(max(0.0, row["oldest_s"]) if row else 0)
        except Exception as exc:  # the scrape still answers, with the depth unknown
            logger.warning("queue depth sample failed: %r", exc)
            self.queue_depth.set(float("nan"))
            self.queue_oldest.set(float("nan"))

    def bind_gauge(self, gauge: Gauge, fn: Callable[[], float]) -> None:
        gauge.set_function(fn)

    def render(self) -> bytes:
        return generate_latest(self.registry)
