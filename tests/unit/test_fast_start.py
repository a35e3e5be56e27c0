"""Event-driven starts: which events claim, and how claims coalesce (the claim itself faked:
tests/integration/test_claim.py runs the real one against DBOS's)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from threadgate.settings import load_settings
from threadgate.workflows import internals
from threadgate.workflows.internals import Claimed
from threadgate.workflows.starts import Starts

pytestmark = pytest.mark.unit

QUEUE = "fake-queue"  # the Starts under test claim from it; the session's pods, from theirs


class FakeDb:
    class pool:  # stands in for the psycopg pool attribute
        @staticmethod
        @contextlib.asynccontextmanager
        async def connection() -> AsyncIterator[object]:
            yield object()


class Queue:
    """The claims a Starts makes, answered from a plan; each can be held open."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.claims: list[str | None] = []  # partition of each claim (None: all)
        self.startable: dict[str, list[Claimed]] = {}  # thread -> runs the next claim takes
        self.hold: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.dispatched: list[str] = []
        self.failing: set[str] = set()
        self.back: list[str] = []
        self.planned: set[str] = set()  # every run added

        real_claim = internals.claim

        async def claim(conn: Any, **kw: Any) -> list[Claimed]:
            if kw["queue"] != QUEUE:  # a pod of the session (one event loop) claiming its own
                return await real_claim(conn, **kw)
            self.claims.append(kw["partition"])
            self.entered.set()
            if self.hold is not None:
                await self.hold.wait()
            threads = [kw["partition"]] if kw["partition"] else list(self.startable)
            return [c for t in threads for c in self.startable.pop(t, [])]

        real_dispatch = internals.dispatch

        async def dispatch(c: Claimed, owner: str) -> None:
            if c.run_id not in self.planned:  # a run a session pod claimed: it starts for real
                await real_dispatch(c, owner)
                return
            if c.run_id in self.failing:
                raise RuntimeError("it failed to start")
            self.dispatched.append(c.run_id)

        monkeypatch.setattr(internals, "claim", claim)
        monkeypatch.setattr(internals, "dispatch", dispatch)
        monkeypatch.setattr(internals, "new_owner_xid", lambda: "owner")
        monkeypatch.setattr(internals, "reenqueue", lambda run_id, ex: self.back.append(run_id))

    def add(self, thread: str, run: str, *, behind: bool = False) -> None:
        self.planned.add(run)
        self.startable.setdefault(thread, []).append(
            Claimed(run, thread, {}, steps_recorded=False, behind=behind, attempt=0, replays=0)
        )


def make(kicks: list[int] | None = None) -> Starts:
    async def kick() -> None:
        if kicks is not None:
            kicks.append(1)

    return Starts(load_settings(fast_start=True), FakeDb(), queue=QUEUE, kick=kick)  # type: ignore[arg-type]


async def test_sweeps_during_a_sweep_cause_exactly_one_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = Queue(monkeypatch)
    q.hold = asyncio.Event()
    s = make()
    s.sweep()
    await asyncio.wait_for(q.entered.wait(), 5)  # the first sweep is inside its claim
    for _ in range(10):
        s.sweep()
    q.hold.set()
    await asyncio.wait_for(s.idle(), 5)
    assert q.claims == [None, None]
    s.sweep()  # idle again: a new request sweeps at once
    await asyncio.wait_for(s.idle(), 5)
    assert q.claims == [None, None, None]


async def test_a_run_with_nothing_behind_it_ends_without_a_claim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = Queue(monkeypatch)
    s = make()
    q.add("t", "r1")
    assert await s.claim("t") == ["r1"]
    s.run_ended("t", "r1")
    await asyncio.wait_for(s.idle(), 5)
    assert q.claims == ["t"], "the end of a run nobody waits for claims nothing"


async def test_a_run_queued_behind_is_claimed_when_its_predecessor_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = Queue(monkeypatch)
    s = make()
    q.add("t", "r1", behind=True)  # the claim saw r2 queued behind r1
    await s.claim("t")
    q.add("t", "r2")
    s.run_ended("t", "r1")
    await asyncio.wait_for(s.idle(), 5)
    assert q.claims == ["t", "t"] and q.dispatched == ["r1", "r2"]


async def test_a_waiting_event_marks_a_running_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    q = Queue(monkeypatch)
    s = make()
    q.add("t", "r1")
    await s.claim("t")
    s.heard_waiting("t")
    s.heard_waiting("other")  # not running here, never was: nothing
    await asyncio.wait_for(s.idle(), 5)
    assert q.claims == ["t"]
    q.add("t", "r2")
    s.run_ended("t", "r1")
    await asyncio.wait_for(s.idle(), 5)
    assert q.claims == ["t", "t"] and q.dispatched == ["r1", "r2"]


async def test_a_waiting_event_after_the_run_ended_claims_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The accept saw the previous run still active; it ended here before the event came."""
    q = Queue(monkeypatch)
    s = make()
    q.add("t", "r1")
    await s.claim("t")
    s.run_ended("t", "r1")
    q.add("t", "r2")
    s.heard_waiting("t")
    await asyncio.wait_for(s.idle(), 5)
    assert q.dispatched == ["r1", "r2"]


async def test_a_waiting_event_during_a_claim_waits_for_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claim in flight may take the thread's head from a snapshot without the new run: the
    event is applied once the claim has answered, so the thread is marked, not forgotten."""
    q = Queue(monkeypatch)
    s = make()
    q.add("t", "r1")  # behind=False: the claim's snapshot predates the accept of r2
    q.hold = asyncio.Event()
    s.sweep()
    await asyncio.wait_for(q.entered.wait(), 5)
    s.heard_waiting("t")  # during the claim: t is not running here yet
    q.hold.set()
    await asyncio.wait_for(s.idle(), 5)
    assert "t" in s.waiting
    q.hold = None
    q.add("t", "r2")
    s.run_ended("t", "r1")
    await asyncio.wait_for(s.idle(), 5)
    assert q.dispatched == ["r1", "r2"]


async def test_a_run_dispatched_by_dbos_claims_at_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started by DBOS's worker or by recovery, nothing says whether a run waits behind it."""
    q = Queue(monkeypatch)
    s = make()
    s.run_ended("t", "r-from-dbos")
    await asyncio.wait_for(s.idle(), 5)
    assert q.claims == ["t"]


async def test_a_draining_process_claims_nothing_and_asks_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = Queue(monkeypatch)
    kicks: list[int] = []
    s = make(kicks)
    q.add("t", "r1", behind=True)
    await s.claim("t")
    s.draining = True
    s.run_ended("t", "r1")
    s.sweep()
    s.start_thread("u")
    await asyncio.wait_for(s.idle(), 5)
    assert q.claims == ["t"] and kicks == [1]


async def test_each_claimed_run_starts_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """One run that fails to start goes back to the queue; the others of the claim start."""
    q = Queue(monkeypatch)
    s = make()
    for t, r in (("a", "ra"), ("b", "rb"), ("c", "rc")):
        q.add(t, r)
    q.failing = {"rb"}
    assert await s.claim(None) == ["ra", "rb", "rc"]
    assert q.dispatched == ["ra", "rc"] and q.back == ["rb"]
    assert "b" not in s.running
