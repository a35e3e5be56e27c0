"""A bench-only pod with a prototype start path: measurement code for the TTFC design, not product.

`python -m bench.proto_pod` is `threadgate serve` with `threadgate.workflows.runner.enqueue` wrapped
according to BENCH_START_PATH (read here, in the bench, not by the app):

- `queue`  the product as it is: enqueue; the queue worker's next poll starts the run.
- `eager`  enqueue, then run one claim of the queue at once from this pod, with the very
           function the queue worker's poll uses for this queue
           (`SystemDatabase.start_queued_partitioned_workflows`: same ordering, same SKIP
           LOCKED claim, same partition check) and dispatch what it claimed here. Sweeps are
           coalesced: one at a time, and POSTs during a sweep cause one more. A busy thread
           claims nothing; its run waits for the slot as before. (A per-partition claim with
           `start_queued_workflows` would be narrower but orders ties differently from the
           worker's claim: two claimers could then pick two heads of one partition.)
- `kick`   enqueue, then wake this pod's queue worker thread so that its next poll runs now
           (DBOS 3.4.0 waits on its stop event; we hand the worker a wrapper that a kick can
           also wake).
- `lean`   the product's event-driven start with two cuts to its claims (install_lean).
- `direct` `DBOS.start_workflow_async` (no queue) when the thread has no other active run,
           else enqueue: the tempting shortcut. The queue does not see a direct workflow in
           the thread's partition, so a run queued behind it starts at once: the probe in
           bench/ttfc_paths.py shows the overlap.

All of it leans on dbos 3.4.0 internals (pinned in pyproject); see docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

PATH = os.environ.get("BENCH_START_PATH", "queue")
_tasks: set[asyncio.Future[Any]] = set()


def _keep(fut: asyncio.Future[Any]) -> None:
    _tasks.add(fut)
    fut.add_done_callback(_tasks.discard)


def install_eager() -> None:
    import threadgate.workflows.runner as runner
    from threadgate.workflows.thread_run import QUEUE_NAME

    original = runner.enqueue
    cache: dict[str, Any] = {}
    state = {"running": False, "again": False}

    def sweep() -> None:
        """One claim of the queue, exactly as the queue worker's poll does it for this queue
        (partition_concurrency=1: `start_queued_partitioned_workflows`, same ordering, same
        SKIP LOCKED claim), dispatched here."""
        from dbos._core import execute_dequeued_workflow
        from dbos._dbos import _get_dbos_instance
        from dbos._utils import GlobalParams, generate_uuid
        from sqlalchemy.exc import DBAPIError

        dbos = _get_dbos_instance()
        queue = cache.get("queue")
        if queue is None:
            queue = cache["queue"] = dbos._sys_db.get_queue(QUEUE_NAME)
        owner = generate_uuid()
        try:
            ids = dbos._sys_db.start_queued_partitioned_workflows(
                queue, GlobalParams.executor_id, GlobalParams.app_version, owner_xid=owner
            )
        except DBAPIError:
            return  # a poll elsewhere is claiming right now: it starts the run
        if ids:
            for status in dbos._sys_db.get_workflow_statuses(ids):
                execute_dequeued_workflow(dbos, status, owner)

    async def sweep_soon() -> None:
        """At most one sweep at a time; POSTs during a sweep cause exactly one more."""
        if state["running"]:
            state["again"] = True
            return
        state["running"] = True
        try:
            while True:
                state["again"] = False
                await asyncio.to_thread(sweep)
                if not state["again"]:
                    break
        finally:
            state["running"] = False

    async def enqueue(run: Any) -> None:
        await original(run)
        _keep(asyncio.ensure_future(sweep_soon()))

    runner.enqueue = enqueue


class _Kickable:
    """Stands in for the worker's stop event: `wait` also returns (False) on a kick."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.kicked = threading.Event()

    def is_set(self) -> bool:
        return self.stop.is_set()

    def set(self) -> None:
        self.stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self.kicked.wait(min(left, 0.1)):  # stop is still seen within 0.1 s
                self.kicked.clear()
                break
        return self.stop.is_set()


def install_kick() -> None:
    import dbos._queue as dbos_queue
    import threadgate.workflows.runner as runner
    from threadgate.workflows.thread_run import QUEUE_NAME

    original_worker = dbos_queue.queue_worker_thread
    kicks: dict[str, _Kickable] = {}

    def worker(stop_event: threading.Event, dbos: Any, queue: Any) -> None:
        kick = kicks[queue.name] = _Kickable(stop_event)
        original_worker(kick, dbos, queue)  # type: ignore[arg-type]

    dbos_queue.queue_worker_thread = worker  # looked up by queue_thread at each thread start
    original = runner.enqueue

    async def enqueue(run: Any) -> None:
        await original(run)
        kick = kicks.get(QUEUE_NAME)
        if kick is not None:
            kick.kicked.set()

    runner.enqueue = enqueue


def install_direct() -> None:
    import threadgate.workflows.runner as runner
    from dbos import DBOS, SetWorkflowID
    from threadgate.workflows import thread_run as wf

    original = runner.enqueue
    pools: list[Any] = []

    async def enqueue(run: Any) -> None:
        # Runner.submit holds the thread's advisory lock here, so this check is serialized
        # with every other accept on the thread, across pods. Its own pool: submit holds one
        # of the app pool's connections already (a second one from it deadlocks at 8 POSTs).
        if not pools:
            from psycopg.rows import dict_row
            from psycopg_pool import AsyncConnectionPool

            url = wf.deps().settings.database_url.get_secret_value()
            pool = AsyncConnectionPool(
                url, min_size=1, max_size=16, open=False, kwargs={"row_factory": dict_row}
            )
            await pool.open()
            pools.append(pool)
        async with pools[0].connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) AS n FROM threadgate.runs WHERE thread_id = %s"
                " AND status IN ('pending', 'running') AND run_id <> %s",
                (run.thread_id, run.run_id),
            )
            row = await cur.fetchone()
        if row is not None and row["n"]:
            await original(run)
            return
        with SetWorkflowID(run.run_id):
            await DBOS.start_workflow_async(wf.thread_run, run.thread_id, run.run_id)

    runner.enqueue = enqueue


def install_lean() -> None:
    """The product's event-driven start with two cuts measured before they are proposed:

    1. The sweep when a run ends runs only if its thread has another pending run (a
       `threadgate.runs` read made after DBOS recorded the outcome, so a run accepted
       meanwhile is claimed by its own accept's sweep: race-free). Chat threads rarely queue.
    2. A sweep reuses the queue's row (registered once at start) instead of `get_queue`, and
       tells the claim `is_latest_version=False` instead of reading the versions table: every
       run threadgate enqueues carries an application version, so the NULL-version branch
       that the read decides never matches one of ours (the queue worker still claims any).
    """
    import threadgate.workflows.internals as internals
    import threadgate.workflows.runner as runner
    import threadgate.workflows.thread_run as thread_run
    from threadgate.store.runs import PgRunStore

    cache: dict[str, Any] = {}

    def claim_and_start(queue_name: str) -> list[str]:
        from dbos._core import execute_dequeued_workflow
        from dbos._utils import GlobalParams, generate_uuid

        dbos = internals.dbos_instance()
        if getattr(dbos, "_destroyed", False) or not dbos._launched:
            return []
        queue = cache.get(queue_name)
        if queue is None:
            queue = cache[queue_name] = dbos._sys_db.get_queue(queue_name)
        if queue is None:
            return []
        owner = generate_uuid()
        ids: list[str] = dbos._sys_db.start_queued_partitioned_workflows(
            queue,
            GlobalParams.executor_id,
            GlobalParams.app_version,
            owner_xid=owner,
            is_latest_version=False,
        )
        if ids:
            for status in dbos._sys_db.get_workflow_statuses(ids):
                execute_dequeued_workflow(dbos, status, owner)
        return ids

    runner.claim_and_start = claim_and_start  # type: ignore[assignment]

    threads: dict[asyncio.Task[Any], str] = {}  # a workflow's task -> its thread
    original_finish = PgRunStore.finish

    async def finish(self: Any, run_id: str, thread_id: str, *a: Any, **kw: Any) -> Any:
        task = asyncio.current_task()
        if task is not None:
            threads[task] = thread_id
        return await original_finish(self, run_id, thread_id, *a, **kw)

    PgRunStore.finish = finish  # type: ignore[method-assign]

    async def next_then_sweep(d: Any, thread_id: str) -> None:
        async with d.store.db.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM threadgate.runs"
                " WHERE thread_id = %s AND status = 'pending') AS queued",
                (thread_id,),
            )
            row = await cur.fetchone()
        if row is not None and (row["queued"] if isinstance(row, dict) else row[0]):
            d.run_ended()

    def ended(task: asyncio.Task[Any]) -> None:
        d = thread_run._deps
        thread_id = threads.pop(task, None)
        if d is None or d.run_ended is None:
            return
        if thread_id is None or getattr(d.run_ended.__self__, "draining", False):
            d.run_ended()  # as the product does
            return
        _keep(asyncio.ensure_future(next_then_sweep(d, thread_id)))

    thread_run._ended = ended  # type: ignore[assignment]


INSTALL = {
    "queue": lambda: None,
    "lean": install_lean,
    "eager": install_eager,
    "kick": install_kick,
    "direct": install_direct,
}


def main() -> None:
    INSTALL[PATH]()
    from threadgate.cli import main as cli_main

    cli_main(["serve"])


if __name__ == "__main__":
    main()
