"""Coalescing's time bound: a chunk held back while its predecessor awaits its ack goes out
within THREADGATE_COALESCE_MS, even if that ack never comes (streams/publisher.py).

A fake connection that records publishes and never acks (a unit test: the real server acks in
well under a millisecond, so the bound would never be reached there)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from threadgate.settings import load_settings
from threadgate.streams import events
from threadgate.streams.publisher import Acks, JetStreamPublisher

pytestmark = pytest.mark.unit


class SilentNats:
    """Takes publishes, acks none of them; `sent` holds (loop time, event) of each."""

    is_connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.changed = asyncio.Event()

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Any = None) -> object:
        return object()

    async def publish(
        self, subject: str, data: bytes, reply: str = "", headers: Any = None
    ) -> None:
        self.sent.append((asyncio.get_running_loop().time(), json.loads(data)))
        self.changed.set()

    async def wait_sent(self, n: int) -> float:
        """Until `n` messages were published; the loop time of the n-th."""
        while len(self.sent) < n:
            self.changed.clear()
            await self.changed.wait()
        return self.sent[n - 1][0]


async def publisher(coalesce_ms: float) -> tuple[JetStreamPublisher, SilentNats]:
    nc = SilentNats()
    acks = Acks(nc)  # type: ignore[arg-type]
    await acks.start()
    settings = load_settings(coalesce_ms=coalesce_ms, publish_timeout_s=60)
    pub = JetStreamPublisher(settings, nc, None, acks, "t.thread.x", "run", 1)  # type: ignore[arg-type]
    return pub, nc


async def test_a_held_chunk_goes_out_within_coalesce_ms_without_its_predecessors_ack() -> None:
    pub, nc = await publisher(coalesce_ms=100)
    loop = asyncio.get_running_loop()
    await pub.part(events.chunk("run", 1, 0, "a "))
    assert len(nc.sent) == 1  # nothing in flight yet: sent at once
    held_at = loop.time()
    assert not await pub.part(events.chunk("run", 1, 1, "b "))
    assert pub.merge("c ")  # a delta while it is held joins it
    assert len(nc.sent) == 1
    # Out by its deadline (100 ms; 3 s leaves room for a loaded machine, not for a bound read
    # in the wrong unit), merged, not before the deadline: holding is what merges.
    sent_at = await asyncio.wait_for(nc.wait_sent(2), 3)
    assert sent_at - held_at >= 0.09
    assert nc.sent[1][1]["index"] == 1 and nc.sent[1][1]["text"] == "b c "


async def test_no_coalescing_sends_every_chunk_at_once() -> None:
    pub, nc = await publisher(coalesce_ms=0)
    for i in range(3):
        await pub.part(events.chunk("run", 1, i, f"{i} "))
    assert [e["index"] for _, e in nc.sent] == [0, 1, 2]
