"""Stop signals: kept only for runs executing here; a stop wakes a run waiting on its source."""

from __future__ import annotations

import asyncio
import contextlib

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


async def test_one_read_per_poll_for_every_run_executing_here() -> None:
    """The rows of all runs executing in the process in one query per poll, not one each."""
    reads: list[list[str]] = []
    answers: dict[str, tuple[str | None, int]] = {}
    polled = asyncio.Event()

    async def read(ids: list[str]) -> dict[str, tuple[str | None, int]]:
        reads.append(sorted(ids))
        polled.set()
        return {i: answers.get(i, (None, 1)) for i in ids}

    stops = StopSignals()
    poller = stops.polling(read, 0.01)
    assert stops.polling(read, 5.0) is poller  # one per process
    heard: dict[str, list[tuple[str | None, int]]] = {f"r{i}": [] for i in range(50)}

    def handler(run_id: str) -> object:
        def on(reason: str | None, newest: int) -> bool:
            heard[run_id].append((reason, newest))
            return newest <= 1  # a newer attempt elsewhere: stop hearing

        return on

    with contextlib.ExitStack() as runs:
        for run_id in heard:
            runs.enter_context(poller.polled(run_id, handler(run_id)))  # type: ignore[arg-type]
        await asyncio.wait_for(polled.wait(), 5)
        assert reads[0] == sorted(heard)
        answers["r3"] = (None, 2)
        answers["r7"] = ("cancelled", 1)
        polled.clear()
        while len(reads) < 3:
            polled.clear()
            await asyncio.wait_for(polled.wait(), 5)
        assert "r3" not in reads[-1] and len(reads[-1]) == 49
        assert ("cancelled", 1) in heard["r7"]
    n = len(reads)
    assert poller._task is not None
    await asyncio.wait_for(poller._task, 5)  # nothing executes here any more: the poll ends
    assert len(reads) <= n + 1  # (a read under way as the last run left)
