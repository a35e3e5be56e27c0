"""A run's events as the Vercel AI SDK UI message stream (`x-vercel-ai-ui-message-stream: v1`).

One `UiMessageStream` per client turns the relay's event batches into `data: {json}` SSE
frames that the `ai` package's reader (`readUIMessageStream`, `useChat`) validates and folds
into one assistant UIMessage whose id is the run id:

- the stream opens with `start` (messageId = run id) and `start-step`; a run's attempts all
  live in that one step;
- `chunk` → `text-delta` of an open text part (`text-start` first); a `data` event ends the
  open text part and becomes a `data-<name>` part (id `d<attempt>.<index>`), so text and data
  keep their order in `message.parts`;
- `reset` (a regenerating attempt) → `text-end`, then `reset-step`, which makes the reader
  drop every part of the step — the partial reply — with no error; a transient
  `data-threadgate-reset` part tells the app it happened (`onData`), and the new attempt's
  text comes as new text parts. An `error` part was the other choice: it would make `useChat`
  report a failure for a run that then succeeds;
- `run_started` with `resume_from: k` (a continued attempt) → nothing to reconcile: the deltas
  just continue. Only if this client holds parts from index k on (written by an attempt that
  did not survive) are they cut: `reset-step`, then the kept parts 0..k-1 again;
- `stalled` → a transient `data-threadgate-stalled` part `{executor, message}`; every
  `run_started` sends a transient `data-threadgate-attempt` part, which clears it;
- `done` → `text-end`, `error` (errorText, status `error` only), `finish-step`, `finish`
  (finishReason `stop` | `error` | `other`, messageMetadata `{"threadgate": {...}}`), and the
  route ends the body with `data: [DONE]`.

Part ids depend only on the events (`t<attempt>.<first index>`), never on what this client was
sent before: a client that reconnects with Last-Event-ID gets a fresh encoder that replays the
run silently up to that id and continues with ids the reader already knows.
"""

from __future__ import annotations

import json
from typing import Any

from .events import KEEPALIVE, Event

HEADERS = {
    "x-vercel-ai-ui-message-stream": "v1",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}
DONE = b"data: [DONE]\n\n"
__all__ = ["DONE", "HEADERS", "KEEPALIVE", "UiMessageStream"]

FINISH_REASON = {"success": "stop", "error": "error"}  # cancelled, interrupted: "other"


def _frame(chunk: dict[str, Any]) -> bytes:
    # ensure_ascii: the frame never holds a raw line break or a lone surrogate byte sequence.
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


class UiMessageStream:
    """One client's encoder. `after`: the Last-Event-ID the client resumes after (events up to
    it were sent before: they are folded into the state, not sent again)."""

    def __init__(self, thread_id: str, run_id: str, *, after: int | None = None) -> None:
        self.thread_id = thread_id
        self.run_id = run_id
        self.after = after or 0
        self.attempt = 0
        self.parts: dict[int, Event] = {}  # held parts (chunk and data events) by index
        self.text_id: str | None = None  # the open text part
        self.opened = False
        self.finished = False
        self.anchored = False  # an event of the stream (seq > 0) was seen
        self._out: list[dict[str, Any]] = []

    # ---- the wire -------------------------------------------------------------------------

    def encode(self, batch: list[Event]) -> bytes:
        """The frames for one relay batch (empty batch: a keepalive comment)."""
        if not batch:
            return KEEPALIVE
        frames: list[bytes] = []
        if not self.opened:
            self.opened = True
            self._emit({"type": "start", "messageId": self.run_id, "messageMetadata": self._meta()})
            self._emit({"type": "start-step"})
            self._flush(frames, silent=self.after > 0)
        last_seq = 0
        for i, ev in enumerate(batch):
            if ev.seq:
                self.anchored = True
            elif self.after and not self.anchored and ev.type != "reset":
                # Rebuilt from the store (the run's events left the stream): the log cannot
                # say what this resumed reader holds, so it starts the step over.
                self.anchored = True
                self._end_text()
                self._emit({"type": "reset-step"})
                self.parts.clear()
            self._apply(ev)
            seq = ev.seq or _next_seq(batch, i)  # a reset is sent with the event it precedes
            self._flush(frames, silent=0 < seq <= self.after)
            last_seq = max(last_seq, ev.seq)
        if frames and last_seq > self.after:
            # The resume point goes on the batch's last frame: a client that has it has all.
            frames[-1] = b"id: %d\n" % last_seq + frames[-1]
        return b"".join(frames)

    def _emit(self, chunk: dict[str, Any]) -> None:
        self._out.append(chunk)

    def _flush(self, frames: list[bytes], *, silent: bool) -> None:
        if not silent:
            frames.extend(_frame(c) for c in self._out)
        self._out.clear()

    def _meta(self, **more: Any) -> dict[str, Any]:
        return {"threadgate": {"thread_id": self.thread_id, "run_id": self.run_id, **more}}

    # ---- the rules ------------------------------------------------------------------------

    def _apply(self, ev: Event) -> None:
        if self.finished or ev.run_id != self.run_id:
            return
        if ev.type == "run_started":
            self._started(ev)
        elif ev.type == "reset":
            self._reset(ev.attempt)
        elif ev.type in ("chunk", "data"):
            self._part(ev)
        elif ev.type == "stalled":
            executor = ev.executor or "the pod"
            message = f"{executor} went away, resuming…"
            self._transient("stalled", {"executor": executor, "message": message})
        elif ev.type == "done":
            self._done(ev)

    def _started(self, ev: Event) -> None:
        if ev.attempt < self.attempt:
            return  # a superseded attempt's straggler
        if ev.resume_from is not None:
            k = ev.resume_from
            if any(i >= k and p.attempt < ev.attempt for i, p in self.parts.items()):
                self._cut(lambda i, p: i < k or p.attempt >= ev.attempt, ev.attempt)
        elif ev.attempt > self.attempt and self.parts:
            self._reset(ev.attempt)  # the relay sends `reset` first; this is the fallback
        self.attempt = max(self.attempt, ev.attempt)
        info: dict[str, Any] = {"attempt": ev.attempt}
        if ev.resume_from is not None:
            info["resume_from"] = ev.resume_from
        self._transient("attempt", info)

    def _reset(self, attempt: int) -> None:
        self._end_text()
        self._emit({"type": "reset-step"})
        self._transient("reset", {"attempt": attempt})
        self.parts.clear()
        self.attempt = max(self.attempt, attempt)

    def _cut(self, keep: Any, attempt: int) -> None:
        """Drop held parts that `keep(index, part)` refuses: the reader can only drop a whole
        step, so the step is reset and the kept parts are sent again."""
        kept = {i: p for i, p in sorted(self.parts.items()) if keep(i, p)}
        self._end_text()
        self._emit({"type": "reset-step"})
        self.parts = {}
        for p in kept.values():
            self._send_part(p, attempt)

    def _part(self, ev: Event) -> None:
        assert ev.index is not None
        if ev.attempt < self.attempt or ev.index in self.parts:
            return  # a straggler, or a duplicate of a part this client holds
        if ev.attempt > self.attempt:
            # Its run_started was not seen: held parts from its index on are superseded.
            if any(i >= ev.index for i in self.parts):
                self._cut(lambda i, p: i < (ev.index or 0), ev.attempt)
            self.attempt = ev.attempt
        self._send_part(ev, ev.attempt)

    def _send_part(self, ev: Event, attempt: int) -> None:
        assert ev.index is not None
        self.parts[ev.index] = ev
        if ev.type == "chunk":
            if self.text_id is None:
                self.text_id = f"t{attempt}.{ev.index}"
                self._emit({"type": "text-start", "id": self.text_id})
            self._emit({"type": "text-delta", "id": self.text_id, "delta": ev.text or ""})
        else:
            self._end_text()
            self._emit(
                {"type": f"data-{ev.name}", "id": f"d{ev.attempt}.{ev.index}", "data": ev.data}
            )

    def _end_text(self) -> None:
        if self.text_id is not None:
            self._emit({"type": "text-end", "id": self.text_id})
            self.text_id = None

    def _transient(self, name: str, data: dict[str, Any]) -> None:
        self._emit({"type": f"data-threadgate-{name}", "data": data, "transient": True})

    def _done(self, ev: Event) -> None:
        self._end_text()
        status = ev.status or "error"
        if status == "error":
            err = ev.error or {}
            text = str(err.get("message") or err.get("code") or "the run failed")
            self._emit({"type": "error", "errorText": text})
        self._emit({"type": "finish-step"})
        meta = self._meta(status=status, attempt=max(self.attempt, ev.attempt))
        if ev.error is not None:
            meta["threadgate"]["error"] = ev.error
        reason = FINISH_REASON.get(status, "other")
        self._emit({"type": "finish", "finishReason": reason, "messageMetadata": meta})
        self.finished = True


def _next_seq(batch: list[Event], i: int) -> int:
    for ev in batch[i + 1 :]:
        if ev.seq:
            return ev.seq
    return 0
