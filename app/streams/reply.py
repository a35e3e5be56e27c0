"""A run's reply as its events define it: the fold every reader applies (tail, JetStream, store).

Events come in stream order. A `run_started` without `resume_from` begins the reply again (the
run's first attempt, or one that regenerates it); with `resume_from: k` the attempt keeps the
first k parts and continues, and anything held beyond them is void. Parts (chunks and data
events) share one index sequence: a part is taken only when it is the next index (a gap's far
side and a duplicate are dropped; the publisher sends them again in order). Events of an
attempt older than the newest `run_started` are stragglers of a dead attempt. The run's one
`done` is final, whichever attempt wrote it.

`lineage` keeps each attempt's `run_started` since the reply last began again: that is what
decides whether a client that followed an earlier attempt still holds a prefix of the reply
(`cut`), without any memory of the parts themselves.
"""

from __future__ import annotations

from typing import Any

from .events import Event


class Reply:
    """The reply of one run, folded from its events; parts below `first` are not held.

    `complete`: the fold began at the reply's start (a regenerating `run_started`), so its
    lineage is whole. A fold may also begin at a client's place (`resumed`): it then knows
    every attempt after that client's, which is all `cut` asks about.
    """

    __slots__ = ("complete", "done", "first", "last_seq", "lineage", "parts", "run_id")

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.lineage: list[Event] = []  # run_started events, oldest first
        self.first = 0  # index of parts[0]
        self.parts: list[Event] = []
        self.done: Event | None = None
        self.complete = False
        self.last_seq = 0  # the newest event applied

    @classmethod
    def resumed(cls, run_id: str, attempt: int, parts: int, seq: int) -> Reply:
        """A fold that begins where a client holding `parts` parts of `attempt` stands, after
        the stream sequence `seq` (the events before it are not read)."""
        reply = cls(run_id)
        reply.lineage = [Event("run_started", run_id, attempt, seq, resume_from=parts)]
        reply.first = parts
        reply.complete = True
        reply.last_seq = seq
        return reply

    # ---- reading ---------------------------------------------------------------------------

    @property
    def attempt(self) -> int:
        """The newest attempt that began (0: none yet)."""
        return self.lineage[-1].attempt if self.lineage else 0

    @property
    def started(self) -> Event | None:
        return self.lineage[-1] if self.lineage else None

    @property
    def base(self) -> int:
        """The attempt the reply last began again with."""
        return self.lineage[0].attempt if self.lineage else 0

    @property
    def total(self) -> int:
        """How many parts the reply has now (indexes 0..total-1, held from `first` on)."""
        return self.first + len(self.parts)

    def part(self, index: int) -> Event:
        return self.parts[index - self.first]

    def cut(self, attempt: int, held: int) -> Event | None:
        """For a client holding `held` parts as of `attempt`: the `run_started` of the first
        attempt since that keeps fewer of them (a regenerating one keeps none), else None."""
        if held == 0:
            return None
        for started in self.lineage:
            if started.attempt > attempt and (started.resume_from or 0) < held:
                return started
        if self.done is not None and held > self.total:
            return self.lineage[0] if self.lineage else self.done  # an ending that has fewer
        return None

    def started_of(self, attempt: int) -> Event | None:
        """The `run_started` that began `attempt` (None: before this fold's lineage)."""
        for started in reversed(self.lineage):
            if started.attempt <= attempt:
                return started
        return None

    # ---- folding ---------------------------------------------------------------------------

    def apply(self, ev: Event) -> bool:
        """Fold one event in (stream order); whether it changed the reply."""
        if ev.run_id != self.run_id or self.done is not None:
            return False
        self.last_seq = max(self.last_seq, ev.seq)
        if ev.type == "done":
            self.done = ev
            return True
        if ev.attempt < self.attempt:
            return False  # a straggler of a superseded attempt
        if ev.type == "run_started":
            k = ev.resume_from
            if k is None:
                self.lineage, self.parts, self.first = [ev], [], 0
                self.complete = True
            else:
                self.lineage.append(ev)
                if k < self.first:
                    self.parts, self.first = [], k
                else:
                    del self.parts[k - self.first :]
            return True
        if ev.part and self.lineage and ev.attempt == self.attempt and ev.index == self.total:
            # A part of an attempt whose run_started is not folded in has no place yet.
            self.parts.append(ev)
            return True
        return False

    def forget(self, below: int) -> int:
        """Stop holding the parts below index `below`; how many were dropped."""
        n = min(max(below - self.first, 0), len(self.parts))
        if n:
            del self.parts[:n]
            self.first += n
        return n


def fold(run_id: str, events: list[Event]) -> Reply:
    reply = Reply(run_id)
    for ev in events:
        reply.apply(ev)
    return reply


def text_of(parts: list[Event]) -> str:
    return "".join(p.text or "" for p in parts if p.type == "chunk")


def merged_parts(parts: list[Event]) -> list[dict[str, Any]]:
    """The parts as a conversation shows them: adjacent text merged, data as they came."""
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
