"""The AI SDK encoder (streams/aisdk.py) on hand-made event sequences.

`fold` applies the chunks the way the `ai` package's processUIMessageStream does for the parts
we send (text, data, reset-step, transient data); the package itself reads real pods' streams
in clients/js/test/aisdk.test.js.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from threadgate.streams.aisdk import DONE, UiMessageStream
from threadgate.streams.events import Event, chunk, data, done, reset, run_started, stalled

pytestmark = pytest.mark.unit

R, T = "run-1", "thread-1"


def seq(events: list[Event], start: int = 1) -> list[Event]:
    """Number stored events like JetStream does (a reset is made by the relay: no sequence)."""
    out, n = [], start
    for ev in events:
        if ev.type == "reset":
            out.append(ev)
        else:
            out.append(ev.with_seq(n))
            n += 1
    return out


def frames(raw: bytes) -> list[tuple[int | None, dict[str, Any]]]:
    """(id, chunk) of each frame; the id only on frames that carry one."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        eid, body = None, None
        for line in block.split("\n"):
            if line.startswith("id: "):
                eid = int(line[4:])
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


def encode_all(events: list[Event], *, after: int | None = None, split: int = 1) -> bytes:
    enc = UiMessageStream(T, R, after=after)
    out = b""
    for i in range(0, len(events), split):
        out += enc.encode(events[i : i + split])
    return out


def vary(attempt: int, lo: int, hi: int) -> str:
    return "".join(f"chunk-{i}.{attempt} " for i in range(lo, hi))


def cs(attempt: int, lo: int, hi: int) -> list[Event]:
    return [chunk(R, attempt, i, f"chunk-{i}.{attempt} ") for i in range(lo, hi)]


def test_a_plain_reply() -> None:
    raw = encode_all(seq([run_started(R, 1), *cs(1, 0, 3), done(R, 1, "success")]))
    out = chunks(raw)
    assert out[0] == {
        "type": "start",
        "messageId": R,
        "messageMetadata": {"threadgate": {"thread_id": T, "run_id": R}},
    }
    assert [c["type"] for c in out] == [
        "start",
        "start-step",
        "data-threadgate-attempt",
        "text-start",
        "text-delta",
        "text-delta",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    assert out[-1]["finishReason"] == "stop"
    assert out[-1]["messageMetadata"]["threadgate"]["status"] == "success"
    msg = fold(out)
    assert msg["id"] == R and msg["text"] == vary(1, 0, 3)
    # One id per batch, on its last frame: the stream sequence of the batch's last event.
    assert [eid for eid, _ in frames(raw) if eid is not None] == [1, 2, 3, 4, 5]


def test_regenerated_reply_resets_the_step_without_an_error() -> None:
    events = seq(
        [
            run_started(R, 1),
            *cs(1, 0, 4),
            reset(R, 2),
            run_started(R, 2),
            *cs(2, 0, 5),
            done(R, 2, "success"),
        ]
    )
    out = chunks(encode_all(events))
    types = [c["type"] for c in out]
    assert "error" not in types
    cut = types.index("reset-step")
    assert types[cut - 1] == "text-end" and types[cut + 1] == "data-threadgate-reset"
    assert out[cut + 1] == {
        "type": "data-threadgate-reset",
        "data": {"attempt": 2},
        "transient": True,
    }
    msg = fold(out)
    assert msg["text"] == vary(2, 0, 5)
    assert [p["type"] for p in msg["parts"]] == ["step-start", "text"]


def test_continued_reply_just_continues_the_deltas() -> None:
    events = seq(
        [
            run_started(R, 1),
            *cs(1, 0, 3),
            run_started(R, 2, resume_from=3),
            *cs(2, 3, 6),
            done(R, 2, "success"),
        ]
    )
    out = chunks(encode_all(events))
    assert "reset-step" not in [c["type"] for c in out]
    assert [c["type"] for c in out].count("text-start") == 1
    assert fold(out)["text"] == vary(1, 0, 3) + vary(2, 3, 6)


def test_continuation_that_cuts_held_parts_resends_the_kept_ones() -> None:
    events = seq(
        [
            run_started(R, 1),
            *cs(1, 0, 5),
            run_started(R, 2, resume_from=3),
            *cs(2, 3, 6),
            done(R, 2, "success"),
        ]
    )
    out = chunks(encode_all(events))
    assert [c["type"] for c in out].count("reset-step") == 1
    assert fold(out)["text"] == vary(1, 0, 3) + vary(2, 3, 6)


def test_data_events_are_parts_in_order() -> None:
    events = seq(
        [
            run_started(R, 1),
            chunk(R, 1, 0, "a "),
            data(R, 1, 1, "tool_call", {"name": "search", "args": {"q": "x"}}),
            chunk(R, 1, 2, "b "),
            data(R, 1, 1, "tool_call", {"dup": True}),
            done(R, 1, "success"),
        ]
    )
    out = chunks(encode_all(events))
    msg = fold(out)
    assert [p["type"] for p in msg["parts"]] == ["step-start", "text", "data-tool_call", "text"]
    assert msg["parts"][2] == {
        "type": "data-tool_call",
        "id": "d1.1",
        "data": {"name": "search", "args": {"q": "x"}},
    }
    assert msg["text"] == "a b "


def test_stalled_is_a_transient_part() -> None:
    events = seq([run_started(R, 1), *cs(1, 0, 2), stalled(R, 1, "threadgate-2")])
    out = chunks(encode_all(events))
    assert out[-1] == {
        "type": "data-threadgate-stalled",
        "data": {"executor": "threadgate-2", "message": "threadgate-2 went away, resuming…"},
        "transient": True,
    }


def test_an_error_run_sends_an_error_part_then_finish() -> None:
    err = {"code": "model_error", "message": "the model failed"}
    out = chunks(encode_all(seq([run_started(R, 1), *cs(1, 0, 1), done(R, 1, "error", err)])))
    assert [c["type"] for c in out][-4:] == ["text-end", "error", "finish-step", "finish"]
    assert out[-3] == {"type": "error", "errorText": "the model failed"}
    assert out[-1]["finishReason"] == "error"
    assert out[-1]["messageMetadata"]["threadgate"]["error"] == err


@pytest.mark.parametrize("status", ["cancelled", "interrupted"])
def test_a_stopped_run_finishes_with_reason_other(status: str) -> None:
    out = chunks(encode_all(seq([run_started(R, 1), done(R, 1, status)])))  # type: ignore[arg-type]
    assert out[-1]["finishReason"] == "other"
    assert out[-1]["messageMetadata"]["threadgate"]["status"] == status


def test_stragglers_duplicates_and_other_runs_are_dropped() -> None:
    events = seq(
        [
            run_started(R, 1),
            *cs(1, 0, 2),
            reset(R, 2),
            run_started(R, 2),
            chunk(R, 1, 2, "late "),
            chunk("other", 2, 0, "x "),
            *cs(2, 0, 2),
            *cs(2, 1, 2),
            done(R, 2, "success"),
        ]
    )
    assert fold(chunks(encode_all(events)))["text"] == vary(2, 0, 2)


def test_keepalive_and_done_marker() -> None:
    assert UiMessageStream(T, R).encode([]) == b": keepalive\n\n"
    assert DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("split", [1, 2, 3])
def test_a_resumed_client_continues_with_the_part_ids_it_knows(split: int) -> None:
    """Resume after every batch id: the frames sent before + the resumed stream = the whole."""
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
    whole = frames(encode_all(events, split=split))
    for cut, (eid, _) in enumerate(whole):
        if eid is None:
            continue
        before = [c for _, c in whole[: cut + 1]]
        rest = chunks(encode_all(events, after=eid, split=split))
        assert before + rest == [c for _, c in whole], f"resumed after {eid}"


def test_a_resumed_client_after_a_purge_converges_on_the_new_attempt() -> None:
    """A regenerating attempt purged attempt 1: the resumed stream replays only attempt 2, and
    the reader's message ends the same."""
    first = seq([run_started(R, 1), *cs(1, 0, 3)])
    second = seq([reset(R, 2), run_started(R, 2), *cs(2, 0, 6), done(R, 2, "success")], start=4)
    enc = UiMessageStream(T, R)
    seen = enc.encode(first) + enc.encode(second[:4])  # through chunk 1 of attempt 2: id 6
    assert frames(seen)[-1][0] == 6
    resumed = encode_all(second[1:], after=6)  # the log now holds attempt 2 only
    msg = fold(chunks(seen) + chunks(resumed))
    assert msg["text"] == vary(2, 0, 6)
    assert msg["finish"]["finishReason"] == "stop"


def test_a_resumed_reader_of_a_run_rebuilt_from_the_store_starts_the_step_over() -> None:
    """The run's events left the stream: the relay rebuilds it from the row (no sequences)."""
    first = seq([run_started(R, 1), *cs(1, 0, 3)])
    enc = UiMessageStream(T, R)
    seen = enc.encode(first)
    stored = [run_started(R, 1), chunk(R, 1, 0, vary(1, 0, 5)), done(R, 1, "success")]
    resumed = chunks(encode_all(stored, after=4))
    assert resumed[0] == {"type": "reset-step"}
    msg = fold(chunks(seen) + resumed)
    assert msg["text"] == vary(1, 0, 5)
