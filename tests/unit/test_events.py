from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from threadgate.streams.events import Event, chunk, done, encode_sse, part_frame, sse_frame
from threadgate.streams.position import part_id

pytestmark = pytest.mark.unit

R1 = "0b978031-f7f7-4957-a5a3-b8d3cbd659a2"


def decode_sse(frame: bytes) -> tuple[str | None, str | None, str]:
    """A reader per the SSE spec: fields per line, data lines joined with LF."""
    text = frame.decode()
    assert text.endswith("\n\n")
    event = eid = None
    data: list[str] = []
    for line in text[:-2].split("\n"):
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id":
            eid = value
    return event, eid, "\n".join(data)


@given(st.text())
def test_any_text_round_trips_through_data_lines(text: str) -> None:
    event, eid, data = decode_sse(encode_sse("chunk", text, 7))
    assert (event, eid) == ("chunk", "7")
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    assert data == normalized


def test_event_round_trips_through_jetstream_bytes() -> None:
    ev = chunk(R1, 2, 5, "hi\nthere")
    back = Event.from_bytes(ev.to_bytes(), seq=9)
    assert back == ev.with_seq(9)
    started = Event("run_started", R1, 3, resume_from=4, executor="p-1", run_seq=17)
    assert Event.from_bytes(started.to_bytes(), seq=2) == started.with_seq(2)


def test_sse_frame_of_a_chunk_says_what_a_client_holds_after_it() -> None:
    event, eid, data = decode_sse(part_frame(chunk(R1, 1, 0, "chunk-0 ").with_seq(3)))
    assert (event, eid) == ("chunk", part_id(R1, 1, 1, 3))
    assert json.loads(data) == {"run_id": R1, "attempt": 1, "index": 0, "text": "chunk-0 "}


def test_done_carries_error() -> None:
    _, _, data = decode_sse(sse_frame(done(R1, 1, "error", {"code": "x", "message": "y"}), "x"))
    assert json.loads(data)["error"] == {"code": "x", "message": "y"}


@pytest.mark.parametrize(
    "ev",
    [
        chunk(R1, 2, 5, 'hi\nthere \u00e9 \u2028 "q" \\'),
        chunk(R1, 2, 5, "\x00 \ud800"),
        Event("data", R1, 1, index=3, name="n", data={"a": "\x00"}),
    ],
)
def test_frame_cut_from_stored_bytes_matches_the_encoded_frame(ev: Event) -> None:
    """A part's fast frame (from the JetStream bytes) reads the same as the long way."""
    fast = Event.from_bytes(ev.to_bytes(), seq=11).frame
    slow = part_frame(ev.with_seq(11))
    assert fast != b"" and decode_sse(fast)[:2] == decode_sse(slow)[:2]
    assert json.loads(decode_sse(fast)[2]) == json.loads(decode_sse(slow)[2])


@given(st.text(), st.integers(0, 10**6), st.integers(0, 10**6))
def test_any_chunk_text_round_trips_through_its_bytes(text: str, attempt: int, index: int) -> None:
    """Whatever the text (lone surrogates included: orjson refuses them, json.dumps escapes
    them), the stored bytes are compact JSON, type first, and decode to the same event."""
    ev = chunk(R1, attempt, index, text)
    data = ev.to_bytes()
    expected = {"type": "chunk", "run_id": R1, "attempt": attempt, "index": index}
    assert json.loads(data) == {**expected, "text": text}
    assert data.startswith(b'{"type":"chunk","run_id":"%s",' % R1.encode())
    assert Event.from_bytes(data, seq=3) == ev.with_seq(3)


def test_bytes_from_another_writer_still_make_a_valid_frame() -> None:
    data = b'{\n  "type": "chunk", "run_id": "r1", "attempt": 1, "index": 0, "text": "a"\n}'
    event, eid, body = decode_sse(Event.from_bytes(data.replace(b"r1", R1.encode()), seq=5).frame)
    assert (event, eid) == ("chunk", part_id(R1, 1, 1, 5))
    assert json.loads(body) == {"run_id": R1, "attempt": 1, "index": 0, "text": "a"}
