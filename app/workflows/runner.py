"""Submitting runs to the thread queue, and stopping them.

A run is accepted in one transaction: its row, its user message and its DBOS workflow's
enqueue row commit together (no run is ever accepted without its workflow). It then starts on
an event (app/workflows/starts.py): this process claims an idle thread's run at once; a run
accepted behind a busy thread is announced on the NATS control subject, so that the process
running the thread claims it when its run ends. DBOS's queue poll is only the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dbos import DBOS, SetEnqueueOptions, SetWorkflowID
from nats.aio.client import Client as NATS
from psycopg import AsyncConnection

from .. import tracing
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
from .internals import enqueue_in, workflow_row
from .starts import Starts
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
    """The thread queue. Its safety-net poll is ours (Starts.safety_net, one statement every
    THREADGATE_QUEUE_POLLING_S); DBOS's own worker polls it too, as a second net, every
    THREADGATE_BACKGROUND_POLLING_S (with event start off, at the queue polling interval)."""
    polling = settings.queue_polling_s
    if settings.fast_start:
        polling = max(polling, settings.background_polling_s)
    await DBOS.register_queue_async(
        QUEUE_NAME,
        partition_concurrency=1,
        polling_interval_sec=polling,
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
        self,
        settings: Settings,
        store: PgRunStore,
        stops: StopSignals,
        nc: NATS | None,
        starts: Starts | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.stops = stops
        self.nc = nc
        self.starts = starts or Starts(settings, store.db, queue=QUEUE_NAME, kick=self.kick)
        self._sub: Any = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # thread -> (lock, users)
        self._accept_lock = asyncio.Lock()  # counting and inserting, for the pod's limit
        self._uncommitted = 0  # accepts of this process counted and inserted, not committed
        # A pod of another version left: its queued runs may be ours now (adoption's move).
        self.on_left: Callable[[], Awaitable[object]] | None = None

    @property
    def draining(self) -> bool:
        return self.starts.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.starts.draining = value

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
        One transaction on one connection (store.accepting): whatever else an accept must do
        with the run (a quota's charge) goes on `conn` before the block ends.
        """
        digest = request.digest()
        stopped: list[tuple[str, str]] = []
        # One accept per thread at a time in this process before a pool connection is taken:
        # otherwise a burst of POSTs on one thread parks every connection on the thread's
        # advisory lock, and the holder cannot get the one more it needs.
        async with (
            contextlib.AsyncExitStack() as until_committed,
            self._local_lock(thread_id),
            self.store.accepting(thread_id) as conn,
        ):
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
                        # Accepted by an older version whose enqueue never happened: heal it.
                        await enqueue_in(conn, self._workflow(existing, None))
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
                until_committed.enter_context(self._uncommitted_accept())
                await tracing.accepted(conn, run.run_id)  # before any pod can start it
                # Behind the thread's active runs, in their version (see enqueue).
                version = active[-1].version if active else None
                await enqueue_in(conn, self._workflow(run, version))
                if request.multitask_strategy == "interrupt":
                    for other in active:
                        # A run that ended meanwhile needs no stop: the new run is accepted
                        # all the same.
                        gone = await self.store.request_stop(other.run_id, "interrupted", conn=conn)
                        if gone is not None:
                            stopped.append((other.run_id, gone.stop_requested or ""))
        for run_id, reason in stopped:
            await self.announce_stop(run_id, reason)
        logger.info(
            "run accepted",
            extra={"thread_id": thread_id, "run_id": run.run_id, "status": run.status},
        )
        self._spawn(self._start(thread_id, busy=bool(active)))
        return run, True

    @contextlib.contextmanager
    def _uncommitted_accept(self) -> Iterator[None]:
        """An accept of this process counted and inserted, until its transaction ends (the
        pod's limit counts it: its row is not visible to the next count before the commit)."""
        self._uncommitted += 1
        try:
            yield
        finally:
            self._uncommitted -= 1

    def _workflow(self, run: Run, version: str | None) -> dict[str, Any]:
        return workflow_row(
            thread_run,
            (run.thread_id, run.run_id),
            queue=QUEUE_NAME,
            workflow_id=run.run_id,
            partition=run.thread_id,
            version=version,
        )

    async def _start(self, thread_id: str, *, busy: bool) -> None:
        """Start a run just accepted: claim it here when its thread was idle; when the claim
        finds the thread busy (its previous run still ending) or it was busy, the process
        running the thread claims it when that run ends (`waiting`)."""
        idle = not busy and not self.starts.draining and self.settings.fast_start
        if idle and await self.starts.claim(thread_id):
            return
        await self.announce_waiting(thread_id)

    @contextlib.asynccontextmanager
    async def _active_limits(
        self, conn: AsyncConnection[Any], owner: str | None, replaced: list[Run]
    ) -> AsyncIterator[None]:
        """Accept (the body: the insert) only within the active-run limits, else 429: a
        principal's runs across the cluster (counted under the principal's lock, which holds
        until the accept commits, so pods accepting at once cannot overshoot) and the runs
        this pod accepted (counted under a lock of this process, with its accepts inserted but
        not yet committed). Runs an `interrupt` replaces do not count."""
        s = self.settings
        if owner:
            await self.store.principal_lock(conn, owner)
        async with self._accept_lock:
            mine, here = await self.store.count_active(conn, owner=owner, accepted_by=s.pod_name)
            here += self._uncommitted
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
        """Claim every startable run of the queue now (start-up, a kick, adoption)."""
        self.starts.sweep()

    def run_ended(self, thread_id: str, run_id: str) -> None:
        """A run executing here ended: its thread's next run may start now."""
        self.starts.run_ended(thread_id, run_id)

    def run_waits(self, thread_id: str) -> None:
        """The finish of a run executing here found a run waiting behind it."""
        self.starts.heard_waiting(thread_id)

    async def kick(self, **why: str) -> None:
        """Ask every pod to claim startable runs (`left`: a pod of that version left)."""
        await self._control({"kick": 1, **why})

    async def announce_waiting(self, thread_id: str) -> None:
        """A run was accepted behind the thread's active run (this process hears it too)."""
        if not await self._control({"waiting": thread_id}):
            self.starts.heard_waiting(thread_id)

    async def _control(self, body: dict[str, Any]) -> bool:
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.publish(self.settings.control_subject, json.dumps(body).encode())
                return True
        return False

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        await self._control({"stop": run_id, "reason": reason})

    async def listen(self) -> None:
        """Hear stop requests made on other pods, and their requests to claim runs."""
        if self.nc is None:
            return

        async def on_msg(msg: Any) -> None:
            with contextlib.suppress(Exception):
                body = json.loads(msg.data)
                if "waiting" in body:
                    self.starts.heard_waiting(str(body["waiting"]))
                    return
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
