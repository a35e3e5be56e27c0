"""Memory is bounded: a tail holds about THREADGATE_TAIL_MAX_BYTES whatever a reply's length
(clients needing what it dropped read it from the stream), and a client costs a few fields on
every format (the AI SDK encoder holds no parts).

The stream is tests/unit/world.py's; tests/integration/test_tail_memory.py does the same
against real JetStream.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import uuid

import pytest
from threadgate.streams.aisdk import UiMessageStream
from threadgate.streams.events import Event, chunk, done, run_started
from threadgate.streams.position import Position, parse
from threadgate.streams.relay import advance
from threadgate.streams.reply import fold
from threadgate.streams.tail import ThreadTail

from tests.unit.world import StrictClient, World, follow, holding, new_run

pytestmark = pytest.mark.unit

BOUND = 64 * 1024
R = str(uuid.UUID(int=3))


def reply_of(chunks: int, attempt: int = 1) -> list[Event]:
    return [
        run_started(R, attempt, run_seq=1),
        *(chunk(R, attempt, i, f"chunk-{i} ") for i in range(chunks)),
    ]


def expected(chunks: int) -> list[object]:
    return [f"chunk-{i} " for i in range(chunks)]


def finished(world: World, chunks: int) -> None:
    for ev in reply_of(chunks) if chunks else []:
        world.publish(ev)
    world.replies[R] = [f"chunk-{i} " for i in range(chunks)]
    world.runs[R].status = "success"
    world.publish(done(R, 1, "success"))


async def test_a_huge_reply_is_held_within_the_bound_and_served_whole() -> None:
    world = World()
    world.runs[R] = new_run(R, 1)
    tail = world.tail(max_bytes=BOUND)
    for ev in reply_of(5000):
        world.publish(ev)
    assert tail.held_bytes <= BOUND
    view = tail.view(R)
    assert view is not None and view.first > 0
    # A late attacher while the run goes on: the dropped part is read from the stream.
    client = StrictClient()
    assert not await follow(world, tail, R, client, Position(R), hang_up_after=4500)
    assert world.reads == 1 and len(client.parts) == 4499
    finished(world, 0)  # the run ends (its done)
    world.replies[R] = expected(5000)  # type: ignore[assignment]
    back = parse(client.last_id)
    assert isinstance(back, Position)
    assert await follow(world, tail, R, client, back)
    assert client.parts == expected(5000)


@pytest.mark.parametrize("at", [1, 2, 700, 3000, 4990, 5000])
async def test_a_client_resumes_anywhere_with_nothing_twice(at: int) -> None:
    world = World()
    world.runs[R] = new_run(R, 1)
    tail = world.tail(max_bytes=BOUND)
    finished(world, 5000)
    whole = StrictClient()
    assert not await follow(world, tail, R, whole, Position(R), hang_up_after=at + 1)
    back = parse(whole.last_id)
    assert isinstance(back, Position) and back.parts == at
    for where in (tail, world.tail(max_bytes=BOUND), world.tail()):
        client = StrictClient()
        client.parts = list(whole.parts)
        place = parse(whole.last_id)  # the relay moves the place it is given
        assert isinstance(place, Position)
        assert await follow(world, where, R, client, place)
        assert client.parts == expected(5000)


async def test_a_slow_client_that_falls_behind_the_bound_misses_nothing() -> None:
    world = World()
    world.runs[R] = new_run(R, 1)
    tail = world.tail(max_bytes=BOUND)
    for ev in reply_of(200):
        world.publish(ev)
    client = StrictClient()
    reading = asyncio.create_task(follow(world, tail, R, client, Position(R), slow=0.01))
    await holding(client, 1)  # it read the start; slowly from here on
    for i in range(200, 6000):
        world.publish(chunk(R, 1, i, f"chunk-{i} "))
    world.replies[R] = expected(6000)  # type: ignore[assignment]
    world.runs[R].status = "success"
    world.publish(done(R, 1, "success"))
    assert await asyncio.wait_for(reading, 30)
    assert client.parts == expected(6000)


async def test_an_ai_sdk_client_holds_no_parts() -> None:
    """The encoder of a 100,000-part reply grows by nothing per part (before: every part)."""
    events = [ev.with_seq(i) for i, ev in enumerate(reply_of(100_000), 1)]
    reply = fold(R, events)
    pos = Position(R)
    enc = UiMessageStream("t", R, pos)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    while batch := advance(pos, reply, truncate=False):
        enc.encode(batch)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    # Only what threadgate's stream code allocated: other threads of this process (a session
    # pod's DBOS and pool threads, under xdist) allocate meanwhile too.
    ours = [
        tracemalloc.Filter(True, "*threadgate*streams*"),
        tracemalloc.Filter(True, "*app*streams*"),
    ]
    diff = after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
    grown = sum(stat.size_diff for stat in diff)
    print(f"\nAI SDK encoder after 100,000 parts: +{grown / 1024:.1f} KiB")
    assert grown < 64 * 1024, grown


def test_what_a_huge_reply_costs_a_tail() -> None:
    """Measured with tracemalloc: unbounded, ~570 bytes per chunk (a 100,000-chunk reply is
    ~57 MB); bounded, within the bound whatever the reply's length."""
    chunks, bound = 30_000, 2 * 1024 * 1024
    events = [ev.to_bytes() for ev in reply_of(chunks)]
    costs = {}
    for max_bytes in (0, bound):
        gc.collect()
        tracemalloc.start()
        tail = ThreadTail("t", max_bytes=max_bytes)
        _fill(tail, events)
        costs[max_bytes] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del tail
    per_chunk = costs[0] / chunks
    print(
        f"\n{chunks}-chunk tail: unbounded {costs[0] / 1e6:.1f} MB ({per_chunk:.0f} B a chunk:"
        f" {per_chunk * 100_000 / 1e6:.0f} MB for 100,000), bounded at {bound / 1e6:.1f} MB:"
        f" {costs[bound] / 1e6:.1f} MB"
    )
    assert per_chunk > 300
    assert costs[bound] < bound * 1.05


def _fill(tail: ThreadTail, events: list[bytes]) -> None:
    async def go() -> None:
        for seq, data in enumerate(events, 1):
            tail.add(Event.from_bytes(data, seq=seq))

    asyncio.run(go())
