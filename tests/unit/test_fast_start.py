"""Event-driven starts' sweeps: a burst of accepts costs a sweep or two, never one each."""

from __future__ import annotations

import asyncio
import threading

import pytest
from threadgate.settings import load_settings
from threadgate.workflows import runner as runner_mod
from threadgate.workflows.runner import Runner
from threadgate.workflows.stops import StopSignals

pytestmark = pytest.mark.unit


async def test_accepts_during_a_sweep_cause_exactly_one_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered, release = threading.Event(), threading.Event()
    sweeps: list[str] = []

    def claim(queue: str) -> list[str]:  # stands in for the DBOS claim: blocks like a query
        sweeps.append(queue)
        entered.set()
        release.wait(5)
        return []

    monkeypatch.setattr(runner_mod, "claim_and_start", claim)
    r = Runner(load_settings(fast_start=True), store=None, stops=StopSignals(), nc=None)  # type: ignore[arg-type]
    r.start_soon()
    assert await asyncio.to_thread(entered.wait, 5)  # the first sweep is inside its claim
    for _ in range(10):
        r.start_soon()
    release.set()
    await asyncio.wait_for(asyncio.gather(*r._kicks), 5)
    assert len(sweeps) == 2
    r.start_soon()  # idle again: a new accept sweeps at once
    await asyncio.wait_for(asyncio.gather(*r._kicks), 5)
    assert len(sweeps) == 3


async def test_a_draining_pod_claims_nothing_and_asks_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sweeps: list[str] = []
    monkeypatch.setattr(runner_mod, "claim_and_start", lambda q: sweeps.append(q) or [])
    kicks: list[dict[str, str]] = []
    r = Runner(load_settings(), store=None, stops=StopSignals(), nc=None)  # type: ignore[arg-type]

    async def kick(**why: str) -> None:
        kicks.append(why)

    r.kick = kick  # type: ignore[method-assign]
    r.run_ended()
    await asyncio.wait_for(asyncio.gather(*r._kicks), 5)
    assert sweeps == ["thread_runs"] and kicks == []
    r.draining = True
    r.run_ended()
    r.start_soon()
    await asyncio.wait_for(asyncio.gather(*r._kicks), 5)
    assert sweeps == ["thread_runs"] and kicks == [{}]
