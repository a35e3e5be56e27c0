"""The AI SDK encoder (streams/aisdk.py) on what the relay sends for hand-made event sequences.

`fold` applies the chunks the way the `ai` package's processUIMessageStream does for the parts
we send (text, data, reset-step, transient data); the package itself reads real pods' streams
in clients/js/test/aisdk.test.js.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from threadgate.streams.aisdk import DONE, UiMessageStream
from threadgate.streams.events import Event, chunk, data, done, run_started, stalled
from threadgate.streams.position import Position, parse
from threadgate.streams.relay import _marker, advance
from threadgate.streams.reply import Reply
from threadgate.streams.reply import fold as fold_events

pytestmark = pytest.mark.unit

R, T = str(uuid.UUID(int=7)), "thread-1"


def seq(events: list[Event], start: int = 1) -> list[Event]:
    """Number stored events like JetStream does."""
    return [ev.with_seq(n) for n, ev in enumerate(events, start=start)]


def frames(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """(id, chunk) of each frame; the id only on frames that carry one."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        eid, body = None, None
        for line in block.split("\n"):
            if line.startswith("id: "):
                eid = line[4:]
            elif line.startswith("data: "):
                body = line[6:]
        assert body is not None and body != "[DONE]"
        out.append((eid, json.loads(body)))
    return out


def chunks(raw: bytes) -> list[dict[str, Any]]:
    return [c for _, c in frames(raw)]


def fold(stream: list[dict[str, Any]]) -> dict[str, Any]:
    """The UIMessage a reader builds (text, data and step parts; transient parts skipped)."""
    msg: dict[str, Any] = {"id": None, "parts": []}
    active: dict[str, dict[str, Any]] = {}
    finished = None
    for c in stream:
        t = c["type"]
        if t == "start":
            msg["id"] = c["messageId"]
        elif t == "start-step":
            msg["parts"].append({"type": "step-start"})
        elif t == "text-start":
            part = {"type": "text", "text": ""}
            active[c["id"]] = part
            msg["parts"].append(part)
        elif t == "text-delta":
            active[c["id"]]["text"] += c["delta"]  # KeyError: a delta of an unknown part
        elif t == "text-end":
            del active[c["id"]]
        elif t == "reset-step":
            starts = [i for i, p in enumerate(msg["parts"]) if p["type"] == "step-start"]
            del msg["parts"][starts[-1] + 1 if starts else 0 :]
            active.clear()
        elif t.startswith("data-") and not c.get("transient"):
            msg["parts"].append({"type": t, "id": c["id"], "data": c["data"]})
        elif t == "finish":
            finished = c
    msg["text"] = "".join(p["text"] for p in msg["parts"] if p["type"] == "text")
    msg["finish"] = finished
    assert not active or finished is None, f"text parts left open: {list(active)}"
    return msg


def encode_all(
    events: list[Event], *, pos: Position | None = None, budget: int = 1, reply: Reply | None = None
) -> bytes:
    """What a client at `pos` (None: a fresh one) gets for the run these events make: the
    relay's batches (about `budget` bytes each, in its mode for readers that cannot cut),
    encoded."""
    reply = reply or fold_events(R, events)
    place = pos or Position(R)
    enc = UiMessageStream(T, R, place)
    out = b""
    if enc.restart:
        out = enc.reset_first()
        place = enc.pos = Position(R, text="")
    while batch := advance(place, reply, truncate=False, budget=budget):
        out += enc.encode(batch)
    return out


def vary(attempt: int, lo: int, hi: int) -> str:
    return "".join(f"chunk-{i}.{attempt} " for i in range(lo, hi))


def cs(attempt: int, lo: int, hi: int) -> list[Event]:
    return [chunk(R, attempt, i, f"chunk-{i}.{attempt} ") for i in range(lo, hi)]


def test_a_plain_reply() -> None:
    out = chunks(encode_all(seq([run_started(R, 1), *cs(1, 0, 3), done(R, 1, "success")])))
    types = [c["type"] for c in out]
    assert types[:2] == ["start", "start-step"] and types[-2:] == ["finish-step", "finish"]
    msg = fold(out)
    assert msg["id"] == R and msg["text"] == vary(1, 0, 3)
    assert msg["finish"]["finishReason"] == "stop"


def test_a_regenerated_reply_resets_the_step_without_an_error() -> None:
    """A client that read attempt 1's parts, then attempt 2 regenerated: reset-step, then the
    new reply; no `error` part."""
    first = seq([run_started(R, 1), *cs(1, 0, 3)])
    pos = Position(R)
    enc = UiMessageStream(T, R, pos)
    seen = enc.encode(advance(pos, fold_events(R, first), truncate=False))
    later = fold_events(R, seq([run_started(R, 2), *cs(2, 0, 4), done(R, 2, "success")], 10))
    rest = enc.encode(advance(pos, later, truncate=False))
    out = chunks(seen) + chunks(rest)
    assert {"type": "reset-step"} in out and not any(c["type"] == "error" for c in out)
    assert fold(out)["text"] == vary(2, 0, 4)


def test_a_continued_reply_just_continues_the_deltas() -> None:
    events = seq([run_started(R, 1), *cs(1, 0, 3), run_started(R, 2, 3), *cs(2, 3, 5)])
    out = chunks(encode_all([*events, done(R, 2, "success").with_seq(99)]))
    assert {"type": "reset-step"} not in out
    assert fold(out)["text"] == vary(1, 0, 3) + vary(2, 3, 5)


def test_a_continuation_that_cuts_held_parts_starts_the_reader_over() -> None:
    pos = Position(R)
    enc = UiMessageStream(T, R, pos)
    seen = enc.encode(
        advance(pos, fold_events(R, seq([run_started(R, 1), *cs(1, 0, 5)])), truncate=False)
    )
    cut = fold_events(
        R,
        seq(
            [
                run_started(R, 1),
                *cs(1, 0, 5),
                run_started(R, 2, 3),
                *cs(2, 3, 6),
                done(R, 2, "success"),
            ]
        ),
    )
    out = chunks(seen) + chunks(enc.encode(advance(pos, cut, truncate=False, budget=10**6)))
    assert fold(out)["text"] == vary(1, 0, 3) + vary(2, 3, 6)


def test_data_events_are_parts_in_order() -> None:
    events = seq(
        [
            run_started(R, 1),
            *cs(1, 0, 2),
            data(R, 1, 2, "cite", {"u": 1}),
            *cs(1, 3, 4),
            done(R, 1, "success"),
        ]
    )
    msg = fold(chunks(encode_all(events)))
    assert [p["type"] for p in msg["parts"]] == ["step-start", "text", "data-cite", "text"]


def test_stalled_is_a_transient_part() -> None:
    pos = Position(R)
    enc = UiMessageStream(T, R, pos)
    out = chunks(enc.encode([_marker(stalled(R, 1, "threadgate-1"), pos)]))
    assert out[-1] == {
        "type": "data-threadgate-stalled",
        "data": {"executor": "threadgate-1", "message": "threadgate-1 went away, resuming…"},
        "transient": True,
    }


def test_an_error_run_sends_an_error_part_then_finish() -> None:
    err = {"code": "model_error", "message": "boom"}
    out = chunks(encode_all(seq([run_started(R, 1), done(R, 1, "error", err)])))
    assert {"type": "error", "errorText": "boom"} in out
    assert out[-1]["finishReason"] == "error"


@pytest.mark.parametrize("status", ["cancelled", "interrupted"])
def test_a_stopped_run_finishes_with_reason_other(status: str) -> None:
    out = chunks(encode_all(seq([run_started(R, 1), done(R, 1, status)])))  # type: ignore[arg-type]
    assert out[-1]["finishReason"] == "other"
    assert out[-1]["messageMetadata"]["threadgate"]["status"] == status


def test_keepalive_and_done_marker() -> None:
    assert UiMessageStream(T, R, Position(R)).encode([]) == b": keepalive\n\n"
    assert DONE == b"data: [DONE]\n\n"


def test_a_resumed_reader_continues_with_the_part_ids_it_knows() -> None:
    """Back after any batch with that batch's id: the frames before + the resumed stream
    fold into the whole message (the open text part goes on under the same id)."""
    events = seq(
        [
            run_started(R, 1),
            *cs(1, 0, 4),
            data(R, 1, 4, "cite", 1),
            *cs(1, 5, 7),
            run_started(R, 2, resume_from=5),
            *cs(2, 5, 9),
            done(R, 2, "success"),
        ]
    )
    whole = frames(encode_all(events))
    want = fold([c for _, c in whole])
    for cut, (eid, _) in enumerate(whole):
        if eid is None:
            continue
        back = parse(eid)
        assert isinstance(back, Position) and (back.done or back.text is not None)
        before = [c for _, c in whole[: cut + 1]]
        if back.done:
            continue
        rest = chunks(encode_all(events, pos=back))
        assert fold(before + rest) == want, f"resumed after {eid}"


def test_a_reader_back_with_a_place_without_encoder_state_starts_over() -> None:
    """A native SSE id (or a v2 one) says nothing of the reader's open text part."""
    events = seq([run_started(R, 1), *cs(1, 0, 5), done(R, 1, "success")])
    seen = chunks(encode_all(seq([run_started(R, 1), *cs(1, 0, 3)])))
    resumed = chunks(encode_all(events, pos=Position(R, 1, 3, 4)))
    assert resumed[0] == {"type": "reset-step"}
    assert fold(seen + resumed)["text"] == vary(1, 0, 5)
