"""Starting runs on events: claims on the event loop, and which threads have a run waiting.

Runs start on events, not on a poll. The process that accepts a run on an idle thread claims
that thread's head at once. A process whose run ends claims its thread's next run only when one
waits: the claim said so (runs were queued behind it), or an accept on the busy thread said so
on the control subject (`waiting`). A process that cannot claim (it drains) asks the others.
Every claim is one statement with DBOS's partitioned predicate (`internals.claim`), dispatched
on this loop; DBOS's queue poll (THREADGATE_QUEUE_POLLING_S) is the safety net for a lost event.

Why the `waiting` events need no query: an accept publishes after its commit. A process that
hears it while the thread runs here marks the thread; if the thread's run ended here lately,
it claims now; while one of its own claims is in flight it first waits for that claim's answer
(a claim whose snapshot predates the accept's commit would not see the new run behind it). A
claim taken after the event sees the new run (`behind`). A run this process did not claim
itself (DBOS's own worker dispatched it) is not known to have nothing behind it: its end claims.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..settings import Settings
from ..store.db import Database
from . import internals
from .internals import Claimed

logger = logging.getLogger(__name__)

RECENT_S = 60.0  # a `waiting` event this late after a thread's run ended here still claims
RECENT_MAX = 10_000

_facts: dict[str, Claimed] = {}  # runs claimed here and still executing: what the claim saw


def claimed(run_id: str) -> Claimed | None:
    """What this process's claim of the run saw (None: another process or DBOS's worker
    dispatched it). `attempt == 0`: the run's first dispatch; `steps_recorded`: any step
    output existed. Exact while the run executes here."""
    return _facts.get(run_id)


class Starts:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        queue: str,
        kick: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.queue = queue
        self.kick = kick  # ask the other processes to claim (when this one drains)
        self.draining = False
        self.running: dict[str, str] = {}  # thread -> run claimed here and executing
        self.waiting: set[str] = set()  # threads running here with a run queued behind
        self.ended: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeping = False
        self._sweep_again = False
        self._threads: dict[str, bool] = {}  # thread -> claim again after the one in flight
        self._in_flight = 0
        self._deferred: list[str] = []  # `waiting` events heard during a claim
        self.claims = 0  # statements run (for tests and metrics)

    # -- events

    def sweep(self) -> None:
        """Claim every startable run of the queue (start-up, a kick from another process,
        adoption). Coalesced: one at a time, and any number of requests during one cause one
        more."""
        if self.draining or not self.settings.fast_start:
            return
        if self._sweeping:
            self._sweep_again = True
            return
        self._sweeping = True
        self._spawn(self._sweep_loop())

    async def safety_net(self) -> None:
        """Sweep every THREADGATE_QUEUE_POLLING_S: a run whose event was lost starts then.
        One statement; DBOS's own queue poll (slower) stays as a second net."""
        while True:
            await asyncio.sleep(self.settings.queue_polling_s)
            self.sweep()

    def start_thread(self, thread_id: str) -> None:
        """Claim the head of one thread's partition (its run may start now)."""
        if self.draining or not self.settings.fast_start:
            return
        if thread_id in self._threads:
            self._threads[thread_id] = True
            return
        self._threads[thread_id] = False
        self._spawn(self._thread_loop(thread_id))

    def heard_waiting(self, thread_id: str) -> None:
        """Another process (or this one) accepted a run behind the thread's active one."""
        if self._in_flight:
            self._deferred.append(thread_id)
            return
        if thread_id in self.running:
            self.waiting.add(thread_id)
        elif self._recently_ended(thread_id):
            self._next(thread_id)

    def run_ended(self, thread_id: str, run_id: str) -> None:
        """A run executing here ended (DBOS recorded its outcome: the partition is free)."""
        internals.forget(run_id)
        _facts.pop(run_id, None)
        mine = self.running.get(thread_id) == run_id
        if mine:
            del self.running[thread_id]
        waits = thread_id in self.waiting
        self.waiting.discard(thread_id)
        loop_time = asyncio.get_running_loop().time()
        self.ended[thread_id] = loop_time
        self.ended.move_to_end(thread_id)
        while len(self.ended) > RECENT_MAX:
            self.ended.popitem(last=False)
        if waits or not mine:
            self._next(thread_id)

    def _next(self, thread_id: str) -> None:
        if self.draining:
            if self.kick is not None:
                self._spawn(self.kick())
        else:
            self.start_thread(thread_id)

    def _recently_ended(self, thread_id: str) -> bool:
        at = self.ended.get(thread_id)
        return at is not None and asyncio.get_running_loop().time() - at < RECENT_S

    # -- claims

    async def _sweep_loop(self) -> None:
        try:
            while True:
                self._sweep_again = False
                await self.claim(None)
                if not self._sweep_again or self.draining:
                    return
        finally:
            self._sweeping = False

    async def _thread_loop(self, thread_id: str) -> None:
        try:
            while True:
                self._threads[thread_id] = False
                await self.claim(thread_id)
                if not self._threads.get(thread_id) or self.draining:
                    return
        finally:
            self._threads.pop(thread_id, None)

    async def claim(self, thread_id: str | None) -> list[str]:
        """One claim (a thread's partition, or all of them), each claimed run dispatched here.
        A failure is logged: DBOS's queue poll starts the runs instead."""
        s = self.settings
        owner = internals.new_owner_xid()
        self._in_flight += 1
        got: list[Claimed] = []
        try:
            async with self.db.pool.connection() as conn:
                self.claims += 1
                got = await internals.claim(
                    conn,
                    queue=self.queue,
                    executor=s.pod_name,
                    version=s.app_version,
                    app=s.app_name,
                    owner_xid=owner,
                    partition=thread_id,
                )
        except Exception as exc:
            logger.debug("claiming startable runs failed: %r", exc)
        finally:
            self._in_flight -= 1
        for c in got:
            self.running[c.thread_id] = c.run_id
            if c.behind:
                self.waiting.add(c.thread_id)
            _facts[c.run_id] = c
            await self._dispatch(c, owner)
        if not self._in_flight and self._deferred:
            heard, self._deferred = self._deferred, []
            for t in heard:
                self.heard_waiting(t)
        return [c.run_id for c in got]

    async def _dispatch(self, c: Claimed, owner: str) -> None:
        """Start it as DBOS's worker does. One that fails to start goes back to the queue
        (DBOS's worker would leave it PENDING under this executor until the next restart)."""
        try:
            await internals.dispatch(c, owner)
        except Exception as exc:
            _facts.pop(c.run_id, None)
            if self.running.get(c.thread_id) == c.run_id:
                del self.running[c.thread_id]
            logger.error(
                "claimed run not started, back to the queue: %r", exc, extra={"run_id": c.run_id}
            )
            try:
                await asyncio.to_thread(internals.reenqueue, c.run_id, self.settings.pod_name)
            except Exception as again:
                logger.error("re-enqueue failed: %r", again, extra={"run_id": c.run_id})

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def idle(self) -> None:
        """Wait until no claim of this process is under way (tests)."""
        while self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*list(self._tasks))
