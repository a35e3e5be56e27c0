"""Stop signals for running runs (cancel, interrupt): DBOS cancel does not stop a running step."""

from __future__ import annotations

import asyncio
import contextlib


class StopSignals:
    """Runs on this pod that were asked to stop, and why. Fed by the control subject."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self._events: dict[str, asyncio.Event] = {}

    def request(self, run_id: str, reason: str) -> None:
        self._reasons.setdefault(run_id, reason)
        self._event(run_id).set()

    def reason(self, run_id: str) -> str | None:
        return self._reasons.get(run_id)

    def forget(self, run_id: str) -> None:
        self._reasons.pop(run_id, None)
        self._events.pop(run_id, None)

    async def wait(self, run_id: str, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as the run is asked to stop."""
        event = self._event(run_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        return event.is_set()

    def _event(self, run_id: str) -> asyncio.Event:
        return self._events.setdefault(run_id, asyncio.Event())
