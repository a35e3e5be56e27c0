"""A tail's memory is bounded (THREADGATE_TAIL_MAX_BYTES): the oldest events leave memory, and
clients that need them read them again from the stream, with the same reply rules.

The stream is a list here (`Stream.history` pages it as JetStream would); tests/integration/
test_tail_memory.py does the same against real JetStream.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncGenerator

import pytest
from threadgate.store.runs import Run
from threadgate.streams.events import Event, chunk, done, run_started
from threadgate.streams.relay import relay, resumed_cursor
from threadgate.streams.tail import ThreadTail

pytestmark = pytest.mark.unit

BOUND = 64 * 1024


class Stream:
    """The subject as JetStream keeps it: every event, by sequence; read in pages."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.reads = 0

    async def history(self, after_seq: int) -> AsyncGenerator[list[Event], None]:
        self.reads += 1
        rest = [e for e in self.events if e.seq > after_seq]
        for i in range(0, len(rest), 100):
            yield rest[i : i + 100]


def feed(tail: ThreadTail, stream: Stream, *events: Event) -> None:
    for ev in events:
        stored = Event.from_bytes(ev.to_bytes(), seq=tail.last_seq + 1)
        stream.events.append(stored)
        tail.add(Event.from_bytes(ev.to_bytes(), seq=stored.seq))


def reply_of(run_id: str, chunks: int, attempt: int = 1) -> list[Event]:
    return [
        run_started(run_id, attempt),
        *(chunk(run_id, attempt, i, f"chunk-{i} ") for i in range(chunks)),
    ]


async def collect(tail: ThreadTail, run_id: str, last_event_id: int | None = None) -> list[Event]:
    async def lookup() -> Run | None:
        return None

    out: list[Event] = []
    async for batch in relay(tail, run_id, lookup, last_event_id=last_event_id, keepalive_s=5):
        out += batch
        if any(e.type == "done" for e in batch):
            return out
    return out


def text(events: list[Event]) -> str:
    parts: list[str] = []
    for e in events:
        if e.type == "reset" or (e.type == "run_started" and e.resume_from is None):
            parts.clear()
        elif e.type == "run_started" and e.resume_from is not None:
            del parts[e.resume_from :]
        elif e.type == "chunk":
            assert e.index == len(parts), (e.index, len(parts))
            parts.append(e.text or "")
    return "".join(parts)


def expected(chunks: int) -> str:
    return "".join(f"chunk-{i} " for i in range(chunks))


async def test_a_huge_reply_is_held_within_the_bound_and_served_whole() -> None:
    stream = Stream()
    tail = ThreadTail("t", max_bytes=BOUND, history=stream.history)
    feed(tail, stream, *reply_of("r", 5000))
    assert tail.held_bytes <= BOUND
    assert tail.trimmed_seq > 0 and tail.head is not None and tail.head.seq == 1
    assert tail.in_flight is tail.head  # the run_started left memory, the tail still knows it
    feed(tail, stream, done("r", 1, "success"))
    assert tail.in_flight is None
    # A late attacher: everything, once, in order, the dropped part read from the stream.
    events = await collect(tail, "r")
    assert [e.type for e in events[:2]] == ["run_started", "chunk"]
    assert text(events) == expected(5000) and events[-1].type == "done"
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    assert stream.reads == 1


@pytest.mark.parametrize("at", [1, 2, 700, 3000, 4990, 5001])
async def test_a_client_resumes_anywhere_with_nothing_twice(at: int) -> None:
    """Last-Event-ID in the part that left memory (read again, quietly), or in the part
    still held (from where the reply stood when the log begins)."""
    stream = Stream()
    tail = ThreadTail("t", max_bytes=BOUND, history=stream.history)
    feed(tail, stream, *reply_of("r", 5000), done("r", 1, "success"))
    held = at > tail.trimmed_seq
    cursor = resumed_cursor(tail, "r", at)
    assert not cursor.unsure
    sent_before = [e for e in stream.events if e.seq <= at]
    rest = await collect(tail, "r", last_event_id=at)
    assert text(sent_before + rest) == expected(5000), (at, held)
    assert all(e.seq > at for e in rest)
    assert stream.reads == (0 if held else 1)


async def test_a_slow_client_that_falls_behind_the_bound_misses_nothing() -> None:
    stream = Stream()
    tail = ThreadTail("t", max_bytes=BOUND, history=stream.history)
    feed(tail, stream, *reply_of("r", 200))

    async def lookup() -> Run | None:
        return None

    got: list[Event] = []
    client = relay(tail, "r", lookup, last_event_id=None, keepalive_s=5)
    got += await anext(client)  # it read the start, then stopped reading
    feed(tail, stream, *(chunk("r", 1, i, f"chunk-{i} ") for i in range(200, 6000)))
    feed(tail, stream, done("r", 1, "success"))
    assert tail.trimmed_seq > got[-1].seq  # what it needs next left memory
    async for batch in client:
        got += batch
        if any(e.type == "done" for e in batch):
            break
    assert text(got) == expected(6000)


async def test_attempts_across_the_bound_keep_the_reply_rules() -> None:
    """A continued attempt after the bound dropped the first one's start, then a regenerating
    one: a late attacher and a resumed client both end with the last attempt's reply."""
    stream = Stream()
    tail = ThreadTail("t", max_bytes=BOUND, history=stream.history)
    feed(tail, stream, *reply_of("r", 3000))
    feed(tail, stream, run_started("r", 2, resume_from=3000))
    feed(tail, stream, *(chunk("r", 2, i, f"chunk-{i} ") for i in range(3000, 4000)))
    assert tail.trimmed_seq > 3002  # attempt 1's start and its run_started left memory
    late = await collect_until_index(tail, "r", 3999)
    assert text(late) == expected(4000)
    mid = 1500
    rest = await collect_until_index(tail, "r", 3999, last_event_id=mid)
    assert text([e for e in stream.events if e.seq <= mid] + rest) == expected(4000)
    # A regenerating attempt starts a new segment: the old one goes first.
    feed(tail, stream, *reply_of("r", 10, attempt=3), done("r", 3, "success"))
    assert text(await collect(tail, "r")) == expected(10)


async def collect_until_index(
    tail: ThreadTail, run_id: str, index: int, last_event_id: int | None = None
) -> list[Event]:
    async def lookup() -> Run | None:
        return None

    out: list[Event] = []
    async for batch in relay(tail, run_id, lookup, last_event_id=last_event_id, keepalive_s=5):
        out += batch
        if any(e.index == index for e in batch):
            return out
    return out


async def test_without_a_history_the_current_reply_is_never_dropped() -> None:
    """Only what can be read again leaves memory: a tail with no history (a source that cannot
    read its subject) keeps its current segment whole, as before."""
    stream = Stream()
    tail = ThreadTail("t", max_bytes=BOUND)
    feed(tail, stream, *reply_of("r", 3000))
    assert tail.trimmed_seq == 0 and len(tail.log) == 3001
    feed(tail, stream, *reply_of("r2", 10))  # the next run: the previous segment may go
    assert tail.held_bytes <= BOUND and tail.trimmed_seq > 0
    assert [e.run_id for e in tail.log].count("r2") == 11


def test_what_a_huge_reply_costs_a_tail() -> None:
    """Measured with tracemalloc: unbounded, ~570 bytes per chunk (a 100,000-chunk reply is
    ~57 MB); bounded, within the bound whatever the reply's length."""
    run_id = "0b978031-f7f7-4957-a5a3-b8d3cbd659a2"
    chunks, bound = 30_000, 2 * 1024 * 1024
    events = [run_started(run_id, 1).to_bytes()]
    events += [chunk(run_id, 1, i, f"chunk-{i} ").to_bytes() for i in range(chunks)]
    costs = {}
    for max_bytes in (0, bound):

        async def history(after: int) -> AsyncGenerator[list[Event], None]:
            yield []

        gc.collect()
        tracemalloc.start()
        tail = ThreadTail("t", max_bytes=max_bytes, history=history)
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
    assert per_chunk > 400
    assert costs[bound] < bound * 1.05


def _fill(tail: ThreadTail, events: list[bytes]) -> None:
    import asyncio

    async def go() -> None:
        for seq, data in enumerate(events, 1):
            tail.add(Event.from_bytes(data, seq=seq))

    asyncio.run(go())
