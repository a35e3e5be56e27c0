"""Starting a just-enqueued run at once instead of at the queue worker's next poll.

The DBOS queue worker polls every `queue_polling_s`; that interval bounds the time from POST
to first chunk. Right after an enqueue, the accepting pod runs DBOS's own claim for that one
partition (the same atomic ENQUEUED → PENDING transaction the worker runs, which enforces
partition_concurrency=1), and executes what it claimed. If the thread is busy the claim
takes nothing and the run waits its turn as usual; if another pod's worker claimed it first,
likewise. Correctness stays with DBOS's claim; this only removes the wait.

It uses DBOS internals (`_sys_db.start_queued_workflows`, `execute_dequeued_workflow`) of the
pinned dbos==3.4.0; `THREADGATE_FAST_START=false` turns it off.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def claim_and_start(queue_name: str, partition_key: str) -> list[str]:
    """Claim and start the partition's next workflows on this executor (blocking: a thread)."""
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
    active = dbos._active_workflows_set
    ids, _ = dbos._sys_db.start_queued_workflows(
        queue,
        GlobalParams.executor_id,
        GlobalParams.app_version,
        partition_key,
        active.count_for_queue(queue_name),
        active.count_for_partition(queue_name, partition_key),
        owner_xid=owner_xid,
    )
    if ids:
        for status in dbos._sys_db.get_workflow_statuses(ids):
            execute_dequeued_workflow(dbos, status, owner_xid)
    return list(ids)
