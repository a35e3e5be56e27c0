"""Runtime: everything a pod holds while it runs; the API reaches it via `app.state.runtime`."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS

from .identity import ExecutorClaim
from .metrics import Metrics
from .settings import Settings
from .store.db import Database
from .store.runs import PgRunStore
from .streams.buffer import JetStreamBuffer
from .streams.tail import TailHub
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

    def queue_worker_alive(self) -> bool:
        name = f"queue-worker-{wf.QUEUE_NAME}"
        return any(t.name == name and t.is_alive() for t in threading.enumerate())
