"""Events of a run as stored in JetStream and as sent to SSE clients."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

EventType = Literal["run_started", "chunk", "done", "reset"]
DoneStatus = Literal["success", "error", "cancelled", "interrupted"]


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a run. `seq` is the JetStream stream sequence (0 before it is stored)."""

    type: EventType
    run_id: str
    attempt: int
    seq: int = 0
    index: int | None = None
    text: str | None = None
    status: DoneStatus | None = None
    error: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    frame: bytes = b""  # its SSE frame, encoded once per pod by the tail (see sse_frame)

    def payload(self) -> dict[str, Any]:
        """The JSON object of the event (what `data:` carries)."""
        body: dict[str, Any] = {"run_id": self.run_id}
        if self.type == "done":
            body["attempt"] = self.attempt
            body["status"] = self.status
            if self.error is not None:
                body["error"] = self.error
        else:
            body["attempt"] = self.attempt
        if self.type == "chunk":
            body["index"] = self.index
            body["text"] = self.text
        body.update(self.extra)
        return body

    def to_bytes(self) -> bytes:
        return json.dumps({"type": self.type, **self.payload()}, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, seq: int = 0) -> Event:
        raw = json.loads(data)
        return cls(
            type=raw["type"],
            run_id=raw["run_id"],
            attempt=int(raw.get("attempt", 0)),
            seq=seq,
            index=raw.get("index"),
            text=raw.get("text"),
            status=raw.get("status"),
            error=raw.get("error"),
        )

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
            self.extra,
        )


def run_started(run_id: str, attempt: int) -> Event:
    return Event("run_started", run_id, attempt)


def chunk(run_id: str, attempt: int, index: int, text: str) -> Event:
    return Event("chunk", run_id, attempt, index=index, text=text)


def done(
    run_id: str, attempt: int, status: DoneStatus, error: dict[str, Any] | None = None
) -> Event:
    return Event("done", run_id, attempt, status=status, error=error)


def reset(run_id: str, attempt: int) -> Event:
    return Event("reset", run_id, attempt)


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


def sse_frame(ev: Event) -> bytes:
    """The SSE frame of an event: `id:` is the stream sequence (a reset has none)."""
    if ev.frame:
        return ev.frame
    data = json.dumps(ev.payload(), separators=(",", ":"), ensure_ascii=False)
    return encode_sse(ev.type, data, ev.seq or None)


def with_frame(ev: Event) -> Event:
    """The event with its SSE frame attached: every client of the pod sends the same bytes."""
    return replace(ev, frame=sse_frame(ev))


KEEPALIVE = b": keepalive\n\n"
