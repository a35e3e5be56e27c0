"""The shared tail log and a client's cursor: resets, stragglers, resumes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from threadgate.store.runs import Run
from threadgate.streams.events import Event, chunk, done, run_started
from threadgate.streams.relay import Cursor, relay, resumed_cursor, step
from threadgate.streams.tail import ThreadTail

pytestmark = pytest.mark.unit


def feed(tail: ThreadTail, *events: Event) -> None:
    for i, ev in enumerate(events, start=tail.last_seq + 1):
        tail.add(ev.with_seq(i))


def label(e: Event) -> str:
    extra = e.index if e.index is not None else e.resume_from if e.resume_from is not None else ""
    return f"{e.type}:{e.attempt}:{extra}"


def play(cursor: Cursor, tail: ThreadTail, run_id: str) -> list[str]:
    out: list[str] = []
    for ev in tail.after(cursor.seq):
        sent = step(cursor, run_id, ev)
        out += [label(e) for e in sent]
        if any(e.type == "done" for e in sent):
            break
    return out


def fresh(tail: ThreadTail, run_id: str) -> Cursor:
    return Cursor(seq=tail.start_of(run_id))


async def test_a_regenerating_attempt_starts_a_segment_and_resets_a_client_that_saw_chunks() -> (
    None
):
    tail = ThreadTail("t")
    feed(tail, run_started("r", 1), chunk("r", 1, 0, "a"), chunk("r", 1, 1, "b"))
    c = fresh(tail, "r")
    assert play(c, tail, "r") == ["run_started:1:", "chunk:1:0", "chunk:1:1"]
    feed(tail, run_started("r", 2), chunk("r", 2, 0, "a"))
    assert play(c, tail, "r") == ["reset:2:", "run_started:2:", "chunk:2:0"]
    # a late attacher sees only the new attempt, without a reset
    assert play(fresh(tail, "r"), tail, "r") == ["run_started:2:", "chunk:2:0"]


async def test_a_continued_attempt_goes_on_without_a_reset() -> None:
    tail = ThreadTail("t")
    feed(tail, run_started("r", 1), chunk("r", 1, 0, "a"), chunk("r", 1, 1, "b"))
    c = fresh(tail, "r")
    assert play(c, tail, "r") == ["run_started:1:", "chunk:1:0", "chunk:1:1"]
    feed(tail, run_started("r", 2, resume_from=2), chunk("r", 2, 2, "c"), done("r", 2, "success"))
    assert play(c, tail, "r") == ["run_started:2:2", "chunk:2:2", "done:2:"]
    # a late attacher gets one coherent reply: attempt 1's parts, then attempt 2's
    late = play(fresh(tail, "r"), tail, "r")
    assert late == [
        "run_started:1:",
        "chunk:1:0",
        "chunk:1:1",
        "run_started:2:2",
        "chunk:2:2",
        "done:2:",
    ]


async def test_the_far_side_of_a_gap_is_never_sent() -> None:
    tail = ThreadTail("t")
    # attempt 1 lost part 1 but stored part 2; attempt 2 continues after part 0
    feed(tail, run_started("r", 1), chunk("r", 1, 0, "a"), chunk("r", 1, 2, "x"))
    c = fresh(tail, "r")
    assert play(c, tail, "r") == ["run_started:1:", "chunk:1:0"]
    feed(tail, run_started("r", 2, resume_from=1), chunk("r", 2, 1, "b"), chunk("r", 2, 2, "c"))
    assert play(c, tail, "r") == ["run_started:2:1", "chunk:2:1", "chunk:2:2"]


async def test_stragglers_of_a_dead_attempt_are_not_sent() -> None:
    tail = ThreadTail("t")
    feed(tail, run_started("r", 2), chunk("r", 1, 7, "old"), chunk("r", 2, 0, "new"))
    assert play(fresh(tail, "r"), tail, "r") == ["run_started:2:", "chunk:2:0"]


async def test_earlier_runs_events_are_skipped_and_done_ends() -> None:
    tail = ThreadTail("t")
    feed(tail, run_started("old", 1), chunk("old", 1, 0, "x"), done("old", 1, "success"))
    c = fresh(tail, "new")
    assert play(c, tail, "new") == []
    feed(tail, run_started("new", 1), chunk("new", 1, 0, "y"), done("new", 1, "success"))
    assert play(c, tail, "new") == ["run_started:1:", "chunk:1:0", "done:1:"]


async def test_resume_mid_attempt_continues_without_reset() -> None:
    tail = ThreadTail("t")
    feed(tail, run_started("r", 1), chunk("r", 1, 0, "a"), chunk("r", 1, 1, "b"))
    c = resumed_cursor(tail, "r", 2)
    assert play(c, tail, "r") == ["chunk:1:1"]


async def test_resume_from_a_dead_attempt_gets_a_reset() -> None:
    tail = ThreadTail("t")
    feed(tail, run_started("r", 1), chunk("r", 1, 0, "a"), chunk("r", 1, 1, "b"))
    feed(tail, run_started("r", 2), chunk("r", 2, 0, "a"))
    c = resumed_cursor(tail, "r", 2)  # the client last saw attempt 1's chunk 0
    assert play(c, tail, "r") == ["chunk:1:1", "reset:2:", "run_started:2:", "chunk:2:0"]


async def test_a_client_behind_the_log_gets_a_reset_when_it_may_hold_anything() -> None:
    tail = ThreadTail("t")
    feed(tail, run_started("a", 1), chunk("a", 1, 0, "x"), done("a", 1, "success"))
    feed(tail, run_started("b", 1), done("b", 1, "success"))
    feed(tail, run_started("c", 1), chunk("c", 1, 0, "z"))
    assert tail.missed(2) and not tail.missed(tail.trimmed_seq)
    assert [e.run_id for e in tail.log] == ["b", "b", "c", "c"]  # a's segment is gone


async def test_a_done_without_chunks_of_a_later_run_starts_a_segment() -> None:
    tail = ThreadTail("t")
    feed(tail, run_started("a", 1), done("a", 1, "success"), done("b", 1, "cancelled"))
    assert play(fresh(tail, "b"), tail, "b") == ["done:1:"]


async def test_a_wait_returns_at_once_when_the_log_changed_since_the_client_looked() -> None:
    """An event taken while the client was writing (between its look and its wait) is not
    left for the next event or the keepalive to deliver."""
    tail = ThreadTail("t")
    seen = tail.last_seq
    feed(tail, run_started("r", 1))
    await asyncio.wait_for(tail.wait(seen, timeout=30), 1)


async def test_one_event_wakes_every_waiter_and_deadlines_wake_only_their_own() -> None:
    tail = ThreadTail("t")
    v = tail.last_seq
    slow = [asyncio.ensure_future(tail.wait(v, timeout=30)) for _ in range(50)]
    quick = asyncio.ensure_future(tail.wait(v, timeout=0.05))
    await asyncio.wait_for(quick, 1)  # woken by the tail's timer
    assert not any(w.done() for w in slow)
    feed(tail, run_started("r", 1))
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


def stored_run(run_id: str, output: str) -> Run:
    now = datetime.now(UTC)
    return Run(
        run_id=run_id,
        thread_id="t",
        seq=1,
        status="success",
        attempt=1,
        executor="p",
        accepted_by="p",
        input="x",
        model_options={},
        multitask_strategy="enqueue",
        idempotency_key=None,
        request_hash=None,
        stop_requested=None,
        timeout_s=None,
        error=None,
        created_at=now,
        started_at=now,
        finished_at=now,
        output=output,
    )


async def relay_labels(
    tail: ThreadTail, run_id: str, output: str, after: Callable[[], None]
) -> list[str]:
    """Relay `run_id` to a client that reads one batch, then stops reading while `after`
    changes the tail (its socket is full), then reads to the end."""

    async def lookup() -> Run:
        return stored_run(run_id, output)

    gen = relay(tail, run_id, lookup, last_event_id=None, keepalive_s=5, recheck_s=0.01)
    got = [label(e) for e in await anext(gen)]
    after()
    async with asyncio.timeout(5):
        async for batch in gen:
            got += [label(e) for e in batch]
    return got


async def test_a_slow_client_finds_its_runs_end_after_the_next_run_began() -> None:
    tail = ThreadTail("t")
    feed(tail, run_started("r1", 1), chunk("r1", 1, 0, "a"))

    def later() -> None:
        feed(tail, chunk("r1", 1, 1, "b"), done("r1", 1, "success"))
        feed(tail, run_started("r2", 1), chunk("r2", 1, 0, "z"), done("r2", 1, "success"))

    got = await relay_labels(tail, "r1", "ab", later)
    assert got == ["run_started:1:", "chunk:1:0", "chunk:1:1", "done:1:"]


async def test_a_slow_client_two_runs_behind_gets_a_reset_and_the_stored_reply() -> None:
    tail = ThreadTail("t")
    feed(tail, run_started("r1", 1), chunk("r1", 1, 0, "a"))

    def later() -> None:
        feed(tail, chunk("r1", 1, 1, "b"), done("r1", 1, "success"))
        feed(tail, run_started("r2", 1), done("r2", 1, "success"))
        feed(tail, run_started("r3", 1), done("r3", 1, "success"))

    got = await relay_labels(tail, "r1", "ab", later)
    assert got[:2] == ["run_started:1:", "chunk:1:0"]
    assert got[2:] == ["reset:1:", "run_started:1:", "chunk:1:0", "done:1:"]


async def test_a_run_whose_done_never_reached_the_tail_ends_from_the_store() -> None:
    """After NATS came back, the tail resubscribed past the purge that removed the run's
    `done`: the next run's events arrive, the client's run has ended in the database."""
    tail = ThreadTail("t")
    feed(tail, run_started("r1", 1), chunk("r1", 1, 0, "a"))

    def later() -> None:
        feed(tail, run_started("r2", 1), chunk("r2", 1, 0, "z"))

    got = await relay_labels(tail, "r1", "ab", later)
    assert got[:2] == ["run_started:1:", "chunk:1:0"]
    assert got[2:] == ["reset:1:", "run_started:1:", "chunk:1:0", "done:1:"]


async def test_a_client_back_on_a_tail_still_catching_up_gets_the_rest() -> None:
    """Back with Last-Event-ID on a pod whose tail of the thread has just started: the log
    does not reach the client's event yet. Read from it then, the client looked as if it
    held nothing and every later part was dropped as the far side of a gap (only `done`)."""
    tail = ThreadTail("t")
    tail._target_seq = 6  # the subject's last sequence when the tail started
    events = [run_started("r", 1)] + [chunk("r", 1, i, f"c{i} ") for i in range(4)]
    events.append(done("r", 1, "success"))

    async def lookup() -> Run:
        return stored_run("r", "c0 c1 c2 c3 ")

    # the client holds run_started and chunks 0 and 1 (sequences 1-3)
    gen = relay(tail, "r", lookup, last_event_id=3, keepalive_s=5, recheck_s=0.01)
    first = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0)  # the relay waits for the log to reach sequence 3
    feed(tail, *events)
    got = [label(e) for e in await first]
    async with asyncio.timeout(5):
        async for batch in gen:
            got += [label(e) for e in batch]
    assert got == ["chunk:1:2", "chunk:1:3", "done:1:"]


async def test_a_client_back_on_a_tail_behind_the_pod_it_left_gets_the_rest() -> None:
    """Back with Last-Event-ID on a pod whose tail is caught up but a few events behind the
    pod the client came from (each pod gets the events on its own). Placed at once, the client
    looked as if it held two parts, not four, and its last part was dropped as the far side
    of a gap (the nemesis: a reply short of its last parts). It waits for the subject's newest
    event, then goes on from what it holds."""
    tail = ThreadTail("t")
    tail.caught_up.set()
    events = [run_started("r", 1)] + [chunk("r", 1, i, f"c{i} ") for i in range(5)]
    events.append(done("r", 1, "success"))

    async def newest() -> int:
        return 5  # chunk 3's: the client got it from the other pod

    tail.subject_last = newest

    async def lookup() -> Run:
        return stored_run("r", "c0 c1 c2 c3 c4 ")

    feed(tail, *events[:3])  # this pod's log: run_started, chunks 0 and 1
    gen = relay(tail, "r", lookup, last_event_id=5, keepalive_s=5, recheck_s=0.01)
    first = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0)  # the relay waits for the log to reach sequence 5
    feed(tail, *events[3:])
    got = [label(e) for e in await first]
    async with asyncio.timeout(5):
        async for batch in gen:
            got += [label(e) for e in batch]
    assert got == ["chunk:1:4", "done:1:"]
