"""Events of a run as stored in JetStream and as sent to SSE clients."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .position import part_id

EventType = Literal["run_started", "chunk", "data", "done", "reset", "stalled"]
DoneStatus = Literal["success", "error", "cancelled", "interrupted"]
# What a run writes to JetStream; `reset` and `stalled` are made by the attach endpoint.
STORED_TYPES = frozenset({"run_started", "chunk", "data", "done"})


@dataclass(slots=True)
class Event:
    """One event of a run. `seq` is the JetStream stream sequence (0 before it is stored).

    Not frozen: a frozen dataclass pays an `object.__setattr__` per field on every event, and
    events are made per chunk on the hot path. Treat them as values all the same.
    """

    type: EventType
    run_id: str
    attempt: int
    seq: int = 0
    index: int | None = None  # chunk and data events share one index sequence per run
    text: str | None = None  # chunk
    status: DoneStatus | None = None  # done
    error: dict[str, Any] | None = None  # done
    name: str | None = None  # data
    data: Any = None  # data: the payload
    resume_from: int | None = None  # run_started of an attempt that continues the run
    executor: str | None = None  # stalled, run_started
    run_seq: int | None = None  # run_started: the run's place among its thread's runs
    # The SSE frame: a part's is shared by every client of a pod (its id depends on the part
    # alone); other events get a frame of their own per client (streams/relay.py).
    frame: bytes = field(default=b"", compare=False, repr=False)

    @property
    def part(self) -> bool:
        """A part of the reply (text or data), with an index."""
        return self.type == "chunk" or self.type == "data"

    def payload(self) -> dict[str, Any]:
        """The JSON object of the event (what `data:` carries)."""
        body: dict[str, Any] = {"run_id": self.run_id}
        if self.type == "stalled":
            body["executor"] = self.executor
            return body
        body["attempt"] = self.attempt
        if self.type == "done":
            body["status"] = self.status
            if self.error is not None:
                body["error"] = self.error
        elif self.type == "chunk":
            body["index"] = self.index
            body["text"] = self.text
        elif self.type == "data":
            body["index"] = self.index
            body["name"] = self.name
            body["payload"] = self.data
        elif self.type == "run_started":
            if self.resume_from is not None:
                body["resume_from"] = self.resume_from
            if self.executor is not None:
                body["executor"] = self.executor
            if self.run_seq is not None:
                body["run_seq"] = self.run_seq
        return body

    def to_bytes(self) -> bytes:
        """The JetStream message: `{"type": ..., <payload>}`, compact, type first (orjson: UTF-8
        as is, about a third of json.dumps's cost). A text orjson refuses (a lone surrogate,
        which only json.dumps can escape) takes the json.dumps way."""
        if self.type == "chunk" and self.text is not None:
            obj: dict[str, Any] = {
                "type": "chunk",
                "run_id": self.run_id,
                "attempt": self.attempt,
                "index": self.index,
                "text": self.text,
            }
        else:
            obj = {"type": self.type, **self.payload()}
        try:
            return orjson.dumps(obj)
        except TypeError:  # orjson: "str is not valid UTF-8", or a payload it cannot encode
            return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, seq: int = 0) -> Event:
        """An event read from JetStream, with its SSE frame made from the same bytes.

        Only the types a run stores are accepted: the type becomes the SSE `event:` line.
        """
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:  # a lone surrogate escaped by json.dumps (to_bytes)
            raw = json.loads(data)
        kind = raw["type"]
        if kind not in STORED_TYPES:
            raise ValueError(f"not an event type of a run: {str(kind)[:40]!r}")
        get = raw.get
        ev = cls(
            kind,
            str(raw["run_id"]),
            int(get("attempt", 0)),
            seq,
            get("index"),
            get("text"),
            get("status"),
            get("error"),
            get("name"),
            get("payload"),
            get("resume_from"),
            get("executor"),
            get("run_seq"),
        )
        if seq and ev.part:
            ev.frame = _part_frame_from_stored(ev, data)
        return ev

    def with_seq(self, seq: int) -> Event:
        return Event(
            self.type,
            self.run_id,
            self.attempt,
            seq,
            self.index,
            self.text,
            self.status,
            self.error,
            self.name,
            self.data,
            self.resume_from,
            self.executor,
            self.run_seq,
        )


def run_started(
    run_id: str,
    attempt: int,
    resume_from: int | None = None,
    executor: str | None = None,
    run_seq: int | None = None,
) -> Event:
    return Event(
        "run_started", run_id, attempt, resume_from=resume_from, executor=executor, run_seq=run_seq
    )


def chunk(run_id: str, attempt: int, index: int, text: str) -> Event:
    return Event("chunk", run_id, attempt, index=index, text=text)


def data(run_id: str, attempt: int, index: int, name: str, payload: Any) -> Event:
    return Event("data", run_id, attempt, index=index, name=name, data=payload)


def done(
    run_id: str, attempt: int, status: DoneStatus, error: dict[str, Any] | None = None
) -> Event:
    return Event("done", run_id, attempt, status=status, error=error)


def reset(run_id: str, attempt: int) -> Event:
    return Event("reset", run_id, attempt)


def stalled(run_id: str, attempt: int, executor: str) -> Event:
    return Event("stalled", run_id, attempt, executor=executor)


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_sse(event: str | None, data: str, event_id: int | str | None = None) -> bytes:
    """One SSE frame. Every line break in `data` becomes a new `data:` line (CR, LF, CRLF)."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
    return ("\n".join(lines) + "\n\n").encode()


def part_frame(ev: Event) -> bytes:
    """A part's SSE frame, made once per pod and shared by its clients: its id says what a
    client holds after it (streams/position.py), which depends on the part alone."""
    if not ev.frame:
        ev.frame = sse_frame(ev, _part_id(ev))
    return ev.frame


def sse_frame(ev: Event, event_id: str | None) -> bytes:
    """The SSE frame of an event, with the id of the client's place after it."""
    payload = ev.payload()
    try:
        return encode_sse(
            ev.type, json.dumps(payload, separators=(",", ":"), ensure_ascii=False), event_id
        )
    except UnicodeEncodeError:  # a lone surrogate from a plug-in: sent escaped, as stored
        return encode_sse(ev.type, json.dumps(payload, separators=(",", ":")), event_id)


def _part_id(ev: Event) -> str:
    assert ev.index is not None
    return part_id(ev.run_id, ev.attempt, ev.index + 1, ev.seq)


def _part_frame_from_stored(ev: Event, data: bytes) -> bytes:
    """A stored part's SSE frame, cut from its bytes: the `data:` JSON is the stored object
    less its leading `"type"` member, so nothing is decoded and encoded again."""
    prefix = _TYPE_PREFIX.get(ev.type)
    if prefix is None or not data.startswith(prefix) or b"\n" in data or b"\r" in data:
        return part_frame(ev)  # written by something else: encode it the long way
    return b"id: %s\nevent: %s\ndata: {%s\n\n" % (
        _part_id(ev).encode(),
        ev.type.encode(),
        data[len(prefix) :],
    )


_TYPE_PREFIX = {t: b'{"type":"%s",' % t.encode() for t in sorted(STORED_TYPES)}


KEEPALIVE = b": keepalive\n\n"
