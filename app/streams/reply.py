"""A run's reply as its stored events define it: the rules every reader of a subject applies.

Events come in stream order. A `run_started` without `resume_from` begins the reply again
(the first attempt, or a regenerating one); with `resume_from: k` the attempt continues after
the first k parts, and anything held beyond them is dropped. Parts (chunks and data events)
share one index sequence; a part is taken only when it is the next index: a gap's far side or
a duplicate is dropped (a continuing attempt publishes them again). Events of an attempt
older than the newest seen are stragglers of a dead attempt.
"""

from __future__ import annotations

from typing import Any

from .events import Event


class ReplyParts:
    """The reply of one run, folded from its events."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.attempt = 0
        self.parts: list[Event] = []

    def apply(self, ev: Event) -> None:
        if ev.run_id != self.run_id or ev.attempt < self.attempt:
            return
        if ev.type == "run_started":
            self.attempt = ev.attempt
            if ev.resume_from is None:
                self.parts.clear()
            else:
                del self.parts[ev.resume_from :]
        elif ev.part:
            self.attempt = ev.attempt
            if ev.index == len(self.parts):
                self.parts.append(ev)

    @property
    def text(self) -> str:
        return "".join(p.text or "" for p in self.parts if p.type == "chunk")


def fold(run_id: str, events: list[Event]) -> ReplyParts:
    reply = ReplyParts(run_id)
    for ev in events:
        reply.apply(ev)
    return reply


def stored_parts(parts: list[Event]) -> list[dict[str, Any]] | None:
    """The parts as stored with the assistant message: adjacent text merged; None when the
    reply is text only (its content says it all)."""
    if not any(p.type == "data" for p in parts):
        return None
    out: list[dict[str, Any]] = []
    for p in parts:
        if p.type == "chunk":
            if out and out[-1]["type"] == "text":
                out[-1]["text"] += p.text or ""
            else:
                out.append({"type": "text", "text": p.text or ""})
        else:
            out.append({"type": "data", "name": p.name, "payload": p.data})
    return out
