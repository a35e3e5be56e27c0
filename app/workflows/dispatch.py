"""Starting a just-enqueued run at once instead of at the queue worker's next poll (opt-in).

The DBOS queue worker polls every `queue_polling_s`; that interval bounds the time from POST
to first chunk. With `THREADGATE_FAST_START=true`, right after an enqueue the accepting pod
runs the very claim the worker runs for a queue with partition_concurrency=1 (the batched
`start_queued_partitioned_workflows`, so ties between claimers break the same way and one run
per thread holds), then executes what it claimed. Nothing claimable: the run waits its turn.

Off by default: it takes a run at a time from ~40 to ~28 ms to first chunk, but with bursts of
runs (10 threads at once) the pod is CPU-bound and it gains nothing while costing more CPU per
run (docs/benchmarks.md, "Time to first chunk"); and it relies on DBOS internals of the pinned
dbos==3.4.0. The accepting pod coalesces its sweeps (Runner._start_soon).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def claim_and_start(queue_name: str) -> list[str]:
    """Claim and start the queue's startable runs on this executor (blocking: a thread)."""
    from dbos._core import execute_dequeued_workflow
    from dbos._dbos import _get_dbos_instance
    from dbos._utils import GlobalParams, generate_uuid

    dbos: Any = _get_dbos_instance()
    if getattr(dbos, "_destroyed", False) or not dbos._launched:
        return []
    queue = dbos._sys_db.get_queue(queue_name)
    if queue is None:
        return []
    owner_xid = generate_uuid()
    ids = dbos._sys_db.start_queued_partitioned_workflows(
        queue, GlobalParams.executor_id, GlobalParams.app_version, owner_xid=owner_xid
    )
    if ids:
        for status in dbos._sys_db.get_workflow_statuses(ids):
            execute_dequeued_workflow(dbos, status, owner_xid)
    return list(ids)
