"""`/healthz` fails while the pod's queue worker is dead: such a pod never starts a queued run
(the docs' liveness probe restarts it), even though it still answers every request."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from threadgate.workflows.internals import dbos_instance
from threadgate.workflows.thread_run import QUEUE_NAME

from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration

WORKER = f"queue-worker-{QUEUE_NAME}"


async def health(pod: Pod, status: int, timeout: float = 30) -> dict[str, Any]:
    """Poll /healthz until it answers `status`; its body."""
    async with asyncio.timeout(timeout):
        while (resp := await pod.http.get("/healthz")).status_code != status:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # a thread's death has no event to wait on
    return dict(resp.json())


# The worker's death is the point: pytest reports every thread that ends by an exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_healthz_is_503_while_the_queue_worker_is_dead(pod: Pod) -> None:
    """The worker thread dies for real (SystemExit at the start of its loop, in that thread
    only; DBOS's queue manager starts another each second, which dies the same way while
    the fault lasts). Once the fault is gone, the next worker lives and /healthz is 200."""
    sys_db = dbos_instance()._sys_db
    real = sys_db.get_queue

    def dies_in_the_worker(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == WORKER:
            raise SystemExit  # ends the thread, as an uncaught error in it would
        return real(*args, **kwargs)

    assert (await pod.http.get("/healthz")).status_code == 200
    sys_db.get_queue = dies_in_the_worker
    try:
        body = await health(pod, 503)
        assert body == {"status": "queue_worker_dead"}
        assert not any(t.name == WORKER and t.is_alive() for t in threading.enumerate())
        # Readiness says so too: the pod takes no traffic it could not start.
        assert (await pod.http.get("/readyz")).status_code == 503
    finally:
        del sys_db.get_queue  # the instance attribute goes: the method is back
    await health(pod, 200)
