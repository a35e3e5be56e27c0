"""A run's events as the Vercel AI SDK UI message stream (`x-vercel-ai-ui-message-stream: v1`).

One `UiMessageStream` per client turns the relay's batches into `data: {json}` SSE frames that
the `ai` package's reader (`readUIMessageStream`, `useChat`, `Chat`) folds into one assistant
UIMessage whose id is the run id. The relay (streams/relay.py, in its mode for readers that
cannot cut a reply) already sends one coherent sequence, so the encoder only translates:

- the stream opens with `start` (messageId = run id) and `start-step`; a run's attempts all
  live in that one step;
- `chunk` → `text-delta` of an open text part (`text-start` first); a `data` event ends the
  open text part and becomes a `data-<name>` part (id `d<attempt>.<index>`), so text and data
  keep their order in `message.parts`;
- `reset` (the reply starts over) → `text-end`, then `reset-step`, which makes the reader
  drop every part of the step with no error; a transient `data-threadgate-reset` part tells
  the app it happened (`onData`), and the reply's parts follow again from the first;
- `run_started` → a transient `data-threadgate-attempt` part `{attempt, resume_from?}`;
  `stalled` → a transient `data-threadgate-stalled` part `{executor, message}`;
- `done` → `text-end`, `error` (errorText, status `error` only), `finish-step`, `finish`
  (finishReason `stop` | `error` | `other`, messageMetadata `{"threadgate": {...}}`), and the
  route ends the body with `data: [DONE]`.

The id on a batch's last frame is the client's place (streams/position.py) with the encoder's
own state in it (the open text part), so a reader that reconnects with Last-Event-ID on any
pod continues the same text part. The encoder holds no parts: its memory is a few fields.
"""

from __future__ import annotations

import json
from typing import Any

from .events import KEEPALIVE, Event
from .position import Position

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
    """One client's encoder. `pos` is the relay's place for this client: a fresh stream's, or
    a resumed one's (its `text` says which text part the reader has open)."""

    def __init__(self, thread_id: str, run_id: str, pos: Position) -> None:
        self.thread_id = thread_id
        self.run_id = run_id
        self.pos = pos
        resumed = pos.parts > 0 or pos.attempt > 0
        self.opened = resumed  # the reader has `start` and `start-step` already
        self.restart = resumed and pos.text is None  # a place with no encoder state in it
        self.text_id: str | None = pos.text or None
        self.attempt = pos.attempt
        self.finished = False
        self._out: list[bytes] = []

    def encode(self, batch: list[Event]) -> bytes:
        """The frames for one relay batch (empty batch: a keepalive comment)."""
        if not batch:
            return KEEPALIVE
        if not self.opened:
            self.opened = True
            self._emit({"type": "start", "messageId": self.run_id, "messageMetadata": self._meta()})
            self._emit({"type": "start-step"})
        for ev in batch:
            self._apply(ev)
        self.pos.text = self.text_id or ""
        if not self._out:
            return b""
        self._out[-1] = b"id: %s\n" % self.pos.id().encode() + self._out[-1]
        frames, self._out = b"".join(self._out), []
        return frames

    def _emit(self, chunk: dict[str, Any]) -> None:
        self._out.append(_frame(chunk))

    def _meta(self, **more: Any) -> dict[str, Any]:
        return {"threadgate": {"thread_id": self.thread_id, "run_id": self.run_id, **more}}

    def _apply(self, ev: Event) -> None:
        if self.finished:
            return
        if ev.type == "run_started":
            self.attempt = max(self.attempt, ev.attempt)
            info: dict[str, Any] = {"attempt": ev.attempt}
            if ev.resume_from is not None:
                info["resume_from"] = ev.resume_from
            self._transient("attempt", info)
        elif ev.type == "reset":
            self._end_text()
            self._emit({"type": "reset-step"})
            self._transient("reset", {"attempt": ev.attempt})
        elif ev.type == "chunk":
            if self.text_id is None:
                self.text_id = f"t{ev.attempt}_{ev.index}"
                self._emit({"type": "text-start", "id": self.text_id})
            self._emit({"type": "text-delta", "id": self.text_id, "delta": ev.text or ""})
        elif ev.type == "data":
            self._end_text()
            self._emit(
                {"type": f"data-{ev.name}", "id": f"d{ev.attempt}.{ev.index}", "data": ev.data}
            )
        elif ev.type == "stalled":
            executor = ev.executor or "the pod"
            message = f"{executor} went away, resuming…"
            self._transient("stalled", {"executor": executor, "message": message})
        elif ev.type == "done":
            self._done(ev)

    def reset_first(self) -> bytes:
        """For a reader back with a place that says nothing of its open text part (a native
        or v2 id): it drops what it holds, and the reply comes again from its first part."""
        self._emit({"type": "reset-step"})
        self._transient("reset", {"attempt": self.attempt})
        self.text_id, self.restart = None, False
        frames, self._out = b"".join(self._out), []
        return frames

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
