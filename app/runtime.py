"""Runtime: everything a pod holds while it runs; the API reaches it via `app.state.runtime`."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS

from .identity import ALIVE_SQL, ExecutorClaim
from .metrics import Metrics
from .readiness import DependencyCheck
from .settings import Settings
from .sources import ReplySource
from .store.db import Database
from .store.runs import PgRunStore
from .streams.buffer import JetStreamBuffer
from .streams.hub import TailHub
from .workflows import thread_run as wf
from .workflows.stops import StopSignals

if TYPE_CHECKING:
    from .workflows.adoption import Adoption
    from .workflows.runner import Runner


@dataclass
class Runtime:
    settings: Settings
    db: Database
    store: PgRunStore
    claim: ExecutorClaim
    metrics: Metrics
    stops: StopSignals
    source: ReplySource
    nc: NATS | None = None
    buffer: JetStreamBuffer | None = None
    hub: TailHub | None = None
    runner: Runner | None = None
    adoption: Adoption | None = None
    launched: bool = False
    draining: bool = False
    drain_deadline: float | None = None  # loop time: in-flight runs get drain_timeout_s, once
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    metrics_server: Any = None  # a uvicorn.Server on THREADGATE_METRICS_PORT, if set
    dependency_checks: dict[str, DependencyCheck] = field(default_factory=dict)  # /readyz

    async def alive(self, pods: list[str]) -> set[str]:
        """Which of these pod names have a live process (their fencing claim is held)."""
        async with self.db.pool.connection(timeout=2.0) as conn:
            cur = await conn.execute(ALIVE_SQL, (pods,))
            return {row["name"] for row in await cur.fetchall()}

    def queue_worker_alive(self) -> bool:
        name = f"queue-worker-{wf.QUEUE_NAME}"
        return any(t.name == name and t.is_alive() for t in threading.enumerate())
