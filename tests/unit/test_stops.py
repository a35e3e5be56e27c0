"""Stop signals: kept only for runs executing here; a stop wakes a run waiting on its source."""

from __future__ import annotations

import asyncio

import pytest
from threadgate.workflows.stops import StopSignals

pytestmark = pytest.mark.unit


def test_stops_for_runs_not_executing_here_are_not_kept() -> None:
    """Every pod hears every stop; only the executing pod used to forget its own."""
    stops = StopSignals()
    for i in range(10_000):
        stops.request(f"run-{i}", "cancelled")
    assert len(stops) == 0
    stops.watch("mine")
    stops.request("mine", "interrupted")
    assert stops.reason("mine") == "interrupted" and len(stops) == 1
    stops.forget("mine")
    assert len(stops) == 0


async def test_a_stop_cancels_the_wait_on_the_source() -> None:
    stops = StopSignals()
    watch = stops.watch("r")
    waiting = asyncio.ensure_future(asyncio.sleep(3600))
    watch.waiting = waiting  # type: ignore[assignment]
    stops.request("r", "cancelled")
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert watch.woke and watch.reason == "cancelled"
    stops.request("r", "interrupted")  # the first reason stands; no second cancel
    assert watch.reason == "cancelled"
