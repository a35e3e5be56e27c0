"""Submitting runs to the thread queue, starting them on events, and stopping them.

Runs start on events, not on a poll: the accepting pod claims a new run at once; a pod that
finishes a run claims what became startable (the thread's next run); a pod that cannot (it
drains, or leaves) asks the others on the NATS control subject. Every claim is DBOS's own
partitioned claim, so one run per thread holds whoever claims; DBOS's queue poll
(THREADGATE_QUEUE_POLLING_S) is only the safety net for a lost event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dbos import DBOS, SetEnqueueOptions, SetWorkflowID
from nats.aio.client import Client as NATS
from psycopg import AsyncConnection

from ..errors import (
    IdempotencyMismatch,
    RunFinished,
    RunNotFound,
    ThreadBusy,
    ThreadNotFound,
    TooManyRequests,
)
from ..ids import new_run_id
from ..settings import Settings
from ..store import quotas
from ..store.runs import TERMINAL, NewRun, PgRunStore, Run
from .internals import claim_and_start
from .stops import STOP_REASONS, StopSignals
from .thread_run import QUEUE_NAME, thread_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunRequest:
    input: str
    multitask_strategy: str = "enqueue"
    model_options: dict[str, Any] | None = None
    timeout_s: float | None = None

    def digest(self) -> str:
        canonical = json.dumps(
            {
                "input": self.input,
                "multitask_strategy": self.multitask_strategy,
                "model_options": self.model_options or {},
                "timeout_s": self.timeout_s,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


async def register_queue(settings: Settings) -> None:
    await DBOS.register_queue_async(
        QUEUE_NAME,
        partition_concurrency=1,
        polling_interval_sec=settings.queue_polling_s,
        on_conflict="always_update",
    )


async def enqueue(run: Run, version: str | None = None) -> None:
    """Idempotent: enqueuing an existing workflow id returns the existing workflow.

    `version`: queue it under that application version instead of this pod's. A thread's runs
    must share one version while they wait: DBOS's claim takes a partition's first run of the
    claimer's version, so pods of two versions could each start a run of one thread at once.
    """
    options = SetEnqueueOptions(queue_partition_key=run.thread_id, app_version=version)
    with SetWorkflowID(run.run_id), options:
        await DBOS.enqueue_workflow_async(QUEUE_NAME, thread_run, run.thread_id, run.run_id)


class Runner:
    """Accepts runs (with multitask strategies and idempotency) and delivers stop requests."""

    def __init__(
        self, settings: Settings, store: PgRunStore, stops: StopSignals, nc: NATS | None
    ) -> None:
        self.settings = settings
        self.store = store
        self.stops = stops
        self.nc = nc
        self._sub: Any = None
        self._kicks: set[asyncio.Task[None]] = set()
        self._sweeping = False  # a fast-start sweep is under way
        self._sweep_again = False  # a run was accepted during it
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # thread -> (lock, users)
        self._accept_lock = asyncio.Lock()  # counting and inserting, for the pod's limit
        self.draining = False
        # A pod of another version left: its queued runs may be ours now (adoption's move).
        self.on_left: Callable[[], Awaitable[object]] | None = None

    @contextlib.asynccontextmanager
    async def _local_lock(self, thread_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(thread_id) or (asyncio.Lock(), 0)
        self._locks[thread_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[thread_id]
            if users == 1:
                del self._locks[thread_id]
            else:
                self._locks[thread_id] = (lock, users - 1)

    async def submit(
        self,
        thread_id: str,
        request: RunRequest,
        *,
        idempotency_key: str | None,
        owner: str | None = None,
    ) -> tuple[Run, bool]:
        """Accept a run. Returns the run and whether it is new (False: an idempotent repeat).

        `owner` is the submitting principal: a new thread becomes theirs, and someone else's
        thread answers ThreadNotFound. None (auth off) records no owner and checks none.
        """
        digest = request.digest()
        # One accept per thread at a time in this process before a pool connection is taken:
        # otherwise a burst of POSTs on one thread parks every connection on the thread's
        # advisory lock, and the holder cannot get the one more it needs.
        async with self._local_lock(thread_id), self.store.thread_lock(thread_id) as conn:
            # Under the thread lock, the only place threads are created: no race with a
            # concurrent first POST by someone else.
            if owner is not None:
                current = await self.store.thread_owner(thread_id, conn=conn)
                if current is not None and current != owner:
                    raise ThreadNotFound()
            if idempotency_key:
                existing = await self.store.find_by_key(conn, thread_id, idempotency_key)
                if existing is not None:
                    if existing.request_hash != digest:
                        raise IdempotencyMismatch(run_id=existing.run_id)
                    if existing.active:
                        await enqueue(existing)  # heals an accept whose enqueue never happened
                    return existing, False
            active = await self.store.active_runs(conn, thread_id)
            if request.multitask_strategy == "reject" and active:
                raise ThreadBusy(active_run_id=active[-1].run_id)
            limit = self.settings.max_queued_runs_per_thread
            if request.multitask_strategy == "enqueue" and len(active) >= limit:
                # `interrupt` is exempt: it stops the queued runs instead of adding to them.
                raise TooManyRequests(f"the thread already has {limit} queued or running runs")
            replaced = active if request.multitask_strategy == "interrupt" else []
            async with self._active_limits(conn, owner, replaced):
                await quotas.charge(conn, self.settings, owner, thread_id, request)
                run = await self.store.insert_run(
                    conn,
                    NewRun(
                        run_id=new_run_id(),
                        thread_id=thread_id,
                        input=request.input,
                        model_options=request.model_options or {},
                        multitask_strategy=request.multitask_strategy,
                        idempotency_key=idempotency_key,
                        request_hash=digest,
                        accepted_by=self.settings.pod_name,
                        owner=owner or "",
                        timeout_s=request.timeout_s,
                    ),
                )
            # Behind the thread's active runs, in their version (see enqueue).
            await enqueue(run, active[-1].version if active else None)
            if request.multitask_strategy == "interrupt":
                for other in active:
                    # On the lock's connection. A run that ended meanwhile needs no stop: the
                    # new run is accepted all the same.
                    stopped = await self.store.request_stop(other.run_id, "interrupted", conn=conn)
                    if stopped is not None:
                        await self.announce_stop(other.run_id, stopped.stop_requested or "")
        logger.info(
            "run accepted",
            extra={"thread_id": thread_id, "run_id": run.run_id, "status": run.status},
        )
        self.start_soon()
        return run, True

    @contextlib.asynccontextmanager
    async def _active_limits(
        self, conn: AsyncConnection[Any], owner: str | None, replaced: list[Run]
    ) -> AsyncIterator[None]:
        """Accept (the body: the insert) only within the active-run limits, else 429: a
        principal's runs across the cluster (counted under the principal's lock, so pods
        accepting at once cannot overshoot) and the runs this pod accepted (counted under a
        lock of this process). Runs an `interrupt` replaces do not count."""
        s = self.settings
        principal = self.store.principal_lock(conn, owner) if owner else contextlib.nullcontext()
        async with principal, self._accept_lock:
            mine, here = await self.store.count_active(conn, owner=owner, accepted_by=s.pod_name)
            mine -= len(replaced)
            here -= sum(1 for r in replaced if r.accepted_by == s.pod_name)
            if owner and mine >= s.max_active_runs_per_principal:
                raise TooManyRequests(
                    f"at most {s.max_active_runs_per_principal} runs per principal may be"
                    " pending or running"
                )
            if here >= s.max_active_runs_per_pod:
                raise TooManyRequests(
                    f"this pod already has {s.max_active_runs_per_pod} runs pending or running"
                )
            yield

    def start_soon(self) -> None:
        """Claim the queue's startable runs now rather than at the next queue poll.

        Sweeps are coalesced: one at a time, and any number of events during a sweep cause
        one more. A burst of POSTs costs a sweep or two, not one each (each sweep claims every
        startable run of the queue). A draining pod claims nothing.
        """
        if self.draining or not self.settings.fast_start:
            return
        if self._sweeping:
            self._sweep_again = True
            return
        self._sweeping = True
        task = asyncio.create_task(self._sweep())
        self._kicks.add(task)
        task.add_done_callback(self._kicks.discard)

    def run_ended(self) -> None:
        """A run executing here ended: its thread's next run may start now. A draining pod
        leaves it to the others (a kick on the control subject)."""
        if self.draining:
            task = asyncio.create_task(self.kick())
            self._kicks.add(task)
            task.add_done_callback(self._kicks.discard)
        else:
            self.start_soon()

    async def kick(self, **why: str) -> None:
        """Ask every pod to claim startable runs (`left`: a pod of that version left)."""
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.publish(
                    self.settings.control_subject, json.dumps({"kick": 1, **why}).encode()
                )

    async def _sweep(self) -> None:
        try:
            while True:
                self._sweep_again = False
                try:
                    await asyncio.to_thread(claim_and_start, QUEUE_NAME)
                except Exception as exc:  # the queue worker's next poll does it instead
                    logger.debug("claiming startable runs failed: %r", exc)
                if not self._sweep_again:
                    return
        finally:
            self._sweeping = False

    async def cancel(self, thread_id: str, run_id: str, *, writer: str | None = None) -> Run:
        """Cancel a queued or running run of a thread `writer` owns (None: anyone's)."""
        run = await self.store.get_run(thread_id, run_id, reader=writer)
        if run is None:
            raise RunNotFound()
        if run.status in TERMINAL:
            raise RunFinished(status=run.status)
        return await self.stop(run, "cancelled")

    async def stop(self, run: Run, reason: str) -> Run:
        """Ask a run to stop: the flag in Postgres is the truth, the control message is speed."""
        updated = await self.store.request_stop(run.run_id, reason)
        if updated is None:
            latest = await self.store.get_run(run.thread_id, run.run_id)
            if latest is None:
                raise RunNotFound()
            raise RunFinished(status=latest.status)
        await self.announce_stop(run.run_id, updated.stop_requested or reason)
        return updated

    async def announce_stop(self, run_id: str, reason: str) -> None:
        self.stops.request(run_id, reason)
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.publish(
                    self.settings.control_subject,
                    json.dumps({"stop": run_id, "reason": reason}).encode(),
                )

    async def listen(self) -> None:
        """Hear stop requests made on other pods, and their requests to claim runs."""
        if self.nc is None:
            return

        async def on_msg(msg: Any) -> None:
            with contextlib.suppress(Exception):
                body = json.loads(msg.data)
                if "kick" in body:
                    if body.get("left") and self.on_left is not None:
                        await self.on_left()
                    self.start_soon()
                    return
                reason = str(body["reason"])
                # The reason becomes the run's final status: only ours are heard (anyone who
                # can publish on NATS could otherwise write any status; see docs/security.md).
                if reason in STOP_REASONS:
                    self.stops.request(str(body["stop"]), reason)

        self._sub = await self.nc.subscribe(self.settings.control_subject, cb=on_msg)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()


async def wait_until_stopped(store: PgRunStore, thread_id: str, run_id: str, timeout: float) -> Run:
    """Poll the run row until it is terminal (used by `cancel?wait=true`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.02
    while True:
        run = await store.get_run(thread_id, run_id)
        if run is None:
            raise RunNotFound()
        if run.status in TERMINAL or loop.time() >= deadline:
            return run
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)
