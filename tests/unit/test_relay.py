"""The one rule (`advance`), the tail as a cache, and the relay choosing where parts come from.

The sequences of issue 24 that reach the relay are reproduced here in process (each failed on
the relay of contract v2); tests/integration/test_resume.py runs them against real JetStream,
PostgreSQL and pods.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from threadgate.streams.events import Event, chunk, done, run_started
from threadgate.streams.position import Position, parse
from threadgate.streams.relay import advance
from threadgate.streams.reply import Reply, fold
from threadgate.streams.tail import ThreadTail

from tests.unit.world import StrictClient, World, follow, holding, new_run

pytestmark = pytest.mark.unit

R = str(uuid.UUID(int=1))
NEXT = str(uuid.UUID(int=2))


def label(e: Event) -> str:
    extra = e.index if e.index is not None else e.resume_from if e.resume_from is not None else ""
    return f"{e.type}:{e.attempt}:{extra}"


def stored(*events: Event) -> list[Event]:
    return [e.with_seq(i) for i, e in enumerate(events, start=1)]


def parts(n: int, attempt: int = 1, start: int = 0, run: str = R) -> list[Event]:
    return [chunk(run, attempt, i, f"c{i}.{attempt} ") for i in range(start, start + n)]


# ---- the rule ------------------------------------------------------------------------------


def test_a_fresh_client_gets_a_continued_reply_in_index_order_each_attempt_announced() -> None:
    reply = fold(R, stored(run_started(R, 1), *parts(4), run_started(R, 2, 2), *parts(2, 2, 2)))
    pos = Position(R)
    got = [label(e) for e in advance(pos, reply)]
    assert got == [
        "run_started:1:",
        "chunk:1:0",
        "chunk:1:1",
        "run_started:2:2",  # parts 2 and 3 of attempt 1 are void: never sent
        "chunk:2:2",
        "chunk:2:3",
    ]
    assert (pos.attempt, pos.parts) == (2, 4)


def test_a_client_of_an_attempt_that_was_regenerated_since_gets_a_reset() -> None:
    reply = fold(R, stored(run_started(R, 3), *parts(2, 3)))  # attempt 3 regenerated
    pos = Position(R, attempt=1, parts=40)
    got = [label(e) for e in advance(pos, reply)]
    assert got == ["reset:3:", "run_started:3:", "chunk:3:0", "chunk:3:1"]


def test_a_continuation_that_keeps_fewer_parts_than_held_cuts_them() -> None:
    reply = fold(R, stored(run_started(R, 1), *parts(5), run_started(R, 2, 3), *parts(1, 2, 3)))
    pos = Position(R, attempt=1, parts=5)
    assert [label(e) for e in advance(pos, reply)] == ["run_started:2:3", "chunk:2:3"]
    # A reader that cannot cut (the AI SDK's) starts over instead.
    pos = Position(R, attempt=1, parts=5)
    got = [label(e) for e in advance(pos, reply, truncate=False)]
    assert got[:2] == ["reset:1:", "run_started:1:"] and got[-2:] == [
        "run_started:2:3",
        "chunk:2:3",
    ]


def test_a_client_that_holds_done_gets_nothing_and_ids_say_what_it_holds() -> None:
    reply = fold(R, stored(run_started(R, 1), *parts(2), done(R, 1, "success")))
    pos = Position(R)
    batch = advance(pos, reply)
    assert pos.done and [e.type for e in batch][-1] == "done"
    last = parse(pos.id())
    assert isinstance(last, Position) and last.done and last.parts == 2
    assert advance(last, reply) == []


def test_a_part_id_is_the_place_after_it_for_any_client() -> None:
    reply = fold(R, stored(run_started(R, 1), *parts(3)))
    pos = Position(R)
    for ev in advance(pos, reply):
        if ev.part:
            from threadgate.streams.events import part_frame

            place = parse(part_frame(ev).split(b"\n")[0][4:].decode())
            assert isinstance(place, Position)
            assert (place.run_id, place.attempt, place.parts, place.seq) == (
                R,
                ev.attempt,
                (ev.index or 0) + 1,
                ev.seq,
            )


def test_a_v2_id_and_garbage() -> None:
    assert parse("4242") == 4242
    assert parse(None) is None and parse("") is None
    from threadgate.errors import InvalidRequest

    for bad in ("²", "abc", "x" * 300, "AAAAAAAAAAAAAAAAAAAAAA.1.2"):
        with pytest.raises(InvalidRequest):
            parse(bad)


# ---- the tail ------------------------------------------------------------------------------


async def test_an_older_runs_events_never_begin_a_run_in_the_tail() -> None:
    """Sequence 5: a `done` (or a run_started) of an earlier run published late, in the
    middle of the thread's next run, is that run's business only."""
    tail = ThreadTail("t")
    for ev in stored(run_started(NEXT, 1, run_seq=2), *parts(3, run=NEXT), done(R, 1, "error")):
        tail.add(ev)
    tail.add(run_started(R, 2, run_seq=1).with_seq(10))
    assert tail.current is not None and tail.current.run_id == NEXT
    assert tail.view(R) is None and tail.view(NEXT) is not None
    assert tail.view(NEXT).total == 3  # type: ignore[union-attr]


async def test_a_bounded_tail_drops_the_earlier_run_first_then_the_oldest_parts() -> None:
    tail = ThreadTail("t", max_bytes=20_000)
    for i, ev in enumerate(
        [
            run_started(R, 1, run_seq=1),
            *parts(10),
            done(R, 1, "success"),
            run_started(NEXT, 1, run_seq=2),
            *parts(60, run=NEXT),
        ],
        start=1,
    ):
        tail.add(ev.with_seq(i))
    assert tail.view(R) is None
    view = tail.view(NEXT)
    assert view is not None and view.first > 0 and view.total == 60
    assert tail.held_bytes <= 20_000


async def test_a_wait_returns_at_once_when_the_log_changed_since_the_client_looked() -> None:
    tail = ThreadTail("t")
    seen = tail.last_seq
    tail.add(run_started(R, 1).with_seq(1))
    await asyncio.wait_for(tail.wait(seen, timeout=30), 1)


async def test_one_event_wakes_every_waiter_and_deadlines_wake_only_their_own() -> None:
    tail = ThreadTail("t")
    v = tail.last_seq
    slow = [asyncio.ensure_future(tail.wait(v, timeout=30)) for _ in range(50)]
    quick = asyncio.ensure_future(tail.wait(v, timeout=0.05))
    await asyncio.wait_for(quick, 1)  # woken by the tail's timer
    assert not any(w.done() for w in slow)
    tail.add(run_started(R, 1).with_seq(1))
    await asyncio.wait_for(asyncio.gather(*slow), 1)
    assert tail._waiters == {}


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    tail = ThreadTail("t")
    w = asyncio.ensure_future(tail.wait(tail.last_seq, timeout=30))
    await asyncio.sleep(0)  # one loop step: the waiter registers
    assert tail._waiters
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert tail._waiters == {}
    tail.close()


def test_stream_seq_reads_the_reply_subject_like_nats_py() -> None:
    from nats.aio.msg import Msg
    from threadgate.streams.buffer import stream_seq

    v1 = "$JS.ACK.threadgate.ordered.1.4242.17.1700000000000000000.3"
    v2 = "$JS.ACK.dom.acchash.threadgate.ordered.1.4242.17.1700000000000000000.3.rnd"
    for reply in (v1, v2):
        msg = Msg(None, subject="s", reply=reply)  # type: ignore[arg-type]
        assert stream_seq(msg) == msg.metadata.sequence.stream == 4242


# ---- the relay: the sequences of issue 24 ---------------------------------------------------


def world_with(*runs: str) -> World:
    world = World()
    for i, run_id in enumerate(runs, start=1):
        world.runs[run_id] = new_run(run_id, i)
    return world


def publish_run(world: World, run_id: str, events: list[Event], status: str = "success") -> None:
    for ev in events:
        world.publish(ev)
    final = fold(run_id, world.events)
    world.replies[run_id] = [p.text or "" for p in final.parts]
    world.runs[run_id].status = status  # type: ignore[assignment]
    world.runs[run_id].attempt = final.attempt
    world.publish(done(run_id, final.attempt, status))  # type: ignore[arg-type]


async def test_sequence_1_resume_after_a_regeneration_on_a_pod_with_no_tail() -> None:
    world = world_with(R)
    run = world.runs[R]
    run.attempts = [{"attempt": 1, "kept": 0}]
    world.publish(run_started(R, 1, run_seq=1))
    for ev in parts(40):
        world.publish(ev)
    client = StrictClient()
    home = world.tail()
    assert not await follow(world, home, R, client, Position(R), hang_up_after=41)
    # The executor dies; attempt 3 regenerates (attempt 2 died before deciding).
    run.attempts += [{"attempt": 2}, {"attempt": 3, "kept": 0}]
    world.purge()
    publish_run(world, R, [run_started(R, 3, run_seq=1), *parts(20, 3)])
    back = parse(client.last_id)
    assert isinstance(back, Position) and back.parts == 40
    for tail in (world.tail(), ThreadTail("t")):  # a fresh pod, and one with nothing at all
        c = StrictClient()
        c.parts = list(client.parts)
        again = parse(client.last_id)
        assert isinstance(again, Position)
        assert await follow(world, tail, R, c, again)
        assert c.parts == world.replies[R]


async def test_sequence_3_a_slow_reader_of_a_long_reply_while_the_next_run_purges() -> None:
    world = world_with(R, NEXT)
    home = world.tail(max_bytes=4000)  # holds a few parts: the rest comes from elsewhere
    publish_run(world, R, [run_started(R, 1, run_seq=1), *parts(300)])
    client = StrictClient()
    assert not await follow(world, home, R, client, Position(R), hang_up_after=20)
    world.purge()  # the thread's next run
    publish_run(world, NEXT, [run_started(NEXT, 1, run_seq=2), *parts(50, run=NEXT)])
    back = parse(client.last_id)
    assert isinstance(back, Position)
    assert await follow(world, home, R, client, back)
    assert client.parts == world.replies[R] and len(client.parts) == 300


async def test_sequence_4_a_slow_client_of_the_previous_run_when_the_next_fills_the_tail() -> None:
    world = world_with(R, NEXT)
    home = world.tail(max_bytes=30_000)
    publish_run(world, R, [run_started(R, 1, run_seq=1), *parts(1900)])
    client = StrictClient()
    reading = asyncio.create_task(follow(world, home, R, client, Position(R), slow=0.001))
    await holding(client, 1)  # it is reading run R
    world.purge()
    publish_run(world, NEXT, [run_started(NEXT, 1, run_seq=2), *parts(600, run=NEXT)])
    assert await asyncio.wait_for(reading, 20)
    assert client.parts == world.replies[R] and len(client.parts) == 1900


async def test_sequence_5_late_attachers_of_the_next_run_despite_a_stale_done() -> None:
    world = world_with(R, NEXT)
    publish_run(world, R, [run_started(R, 1, run_seq=1), *parts(5)])
    world.purge()
    world.publish(run_started(NEXT, 1, run_seq=2))
    for ev in parts(300, run=NEXT)[:150]:
        world.publish(ev)
    world.publish(done(R, 2, "error"))  # a reconciler's `done`, late
    for ev in parts(300, run=NEXT)[150:]:
        world.publish(ev)
    publish_run(world, NEXT, [])
    for tail in (world.tail(), world.tail(max_bytes=5000)):
        client = StrictClient()
        assert await follow(world, tail, NEXT, client, Position(NEXT))
        assert client.parts == world.replies[NEXT] and len(client.parts) == 300


async def test_a_run_whose_done_never_reached_the_tail_ends_from_the_store() -> None:
    """The tail subscribed again after the next run purged the subject: it never sees the
    first run's `done`; its clients end from the stored reply, not at a keepalive forever."""
    world = world_with(R, NEXT)
    tail = world.tail()
    world.publish(run_started(R, 1, run_seq=1))
    for ev in parts(10):
        world.publish(ev)
    world.drop(tail)  # the tail's consumer is gone (NATS restarted)
    world.publish(done(R, 1, "success"))
    world.replies[R] = [p.text or "" for p in parts(10)]
    world.runs[R].status = "success"
    world.purge()
    world.publish(run_started(NEXT, 1, run_seq=2))
    tail.add(world.events[-1])  # resubscribed after the purge
    client = StrictClient()
    assert await asyncio.wait_for(follow(world, tail, R, client, Position(R)), 5)
    assert client.parts == world.replies[R]


async def test_a_reply_for_reading_from_its_middle_on() -> None:
    reply = Reply.resumed(R, 2, 7, 100)
    reply.apply(chunk(R, 2, 7, "x").with_seq(101))
    reply.apply(run_started(R, 3, 5).with_seq(102))
    assert reply.cut(2, 7) is not None and reply.cut(2, 5) is None


async def test_a_database_outage_is_waited_out_with_keepalives() -> None:
    """Its row unreadable (PostgreSQL away), a client whose run ended elsewhere keeps its
    stream (keepalives) and ends from the stored reply once the database is back."""
    world = world_with(R, NEXT)
    tail = world.tail()
    world.publish(run_started(R, 1, run_seq=1))
    for ev in parts(4):
        world.publish(ev)
    world.drop(tail)
    world.publish(done(R, 1, "success"))
    world.replies[R] = [p.text or "" for p in parts(4)]
    world.runs[R].status = "success"
    world.purge()
    tail.add(world.publish(run_started(NEXT, 1, run_seq=2)))
    src = world.sources(tail, R)
    down = True

    async def lookup() -> object:
        if down:
            raise ConnectionError("the database is away")
        return world.runs[R]

    src.lookup = lookup  # type: ignore[assignment]
    from threadgate.streams.relay import relay

    pos = Position(R, 1, 4, 5)
    running = world.runs[R]
    running.status = "running"  # what the pod read before the outage
    stream = relay(pos, running, src, keepalive_s=0.02)
    batches = [await anext(stream) for _ in range(3)]
    assert batches == [[], [], []]  # keepalives, not an end
    down = False
    world.runs[R] = new_run(R, 1)
    world.runs[R].status = "success"
    world.runs[R].attempts = [{"attempt": 1, "kept": 0}]
    got = [e.type async for batch in stream for e in batch]
    assert got == ["done"] and pos.done
