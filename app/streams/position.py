"""A client's place in a run (contract v3): what every SSE event id says, read back by any pod.

An id says what the client holds after that event: the run, the attempt whose parts it
follows, how many of the run's parts it holds (indexes 0..n-1), whether it holds the run's
`done`, and the stream sequence of the event as a hint for reading the rest from JetStream.
Clients treat ids as opaque. The form is `<run>.<attempt>.<parts>.<seq>[.d | .t<text id>]`,
the run as the 22-character base64url form of its UUID; on the AI SDK stream `.t…` names its
open text part and `.n` says none is open. A v2 id (a bare stream sequence) is still accepted: `parse` returns it as an int.
"""

from __future__ import annotations

import base64
import functools
import re
import uuid
from dataclasses import dataclass

from ..errors import InvalidRequest

_V3 = re.compile(
    r"(?P<run>[A-Za-z0-9_-]{22})\.(?P<attempt>[0-9]{1,9})\.(?P<parts>[0-9]{1,12})"
    r"\.(?P<seq>[0-9]{1,19})(?:\.(?:(?P<done>d)|(?P<none>n)|t(?P<text>[0-9]{1,9}_[0-9]{1,12})))?"
)
_V2 = re.compile(r"[0-9]{1,19}")  # ASCII digits: str.isdigit() takes "²"


@dataclass(slots=True)
class Position:
    run_id: str
    attempt: int = 0  # the attempt whose parts the client follows (0: none seen)
    parts: int = 0  # parts held: indexes 0..parts-1
    seq: int = 0  # the stream sequence this place is after (0: not known)
    done: bool = False  # the client holds the run's `done`
    # AI SDK stream: the id of its open text part ("": none open; None: not an AI SDK place)
    text: str | None = None

    def id(self) -> str:
        head = f"{compact(self.run_id)}.{self.attempt}.{self.parts}.{self.seq}"
        if self.done:
            return head + ".d"
        if self.text is not None:
            return f"{head}.{self.text or 'n'}"
        return head


@functools.lru_cache(maxsize=4096)
def compact(run_id: str) -> str:
    return base64.urlsafe_b64encode(uuid.UUID(run_id).bytes).rstrip(b"=").decode()


def part_id(run_id: str, attempt: int, parts: int, seq: int) -> str:
    """The id after a part: the same for every client of a pod, so its frame is shared."""
    return f"{compact(run_id)}.{attempt}.{parts}.{seq}"


def parse(raw: str | None) -> Position | int | None:
    """A Last-Event-ID: a v3 place, a v2 stream sequence, or None for none. InvalidRequest if
    it is neither."""
    if raw is None or raw == "":
        return None
    if _V2.fullmatch(raw):
        return int(raw)
    m = _V3.fullmatch(raw)
    if m is None:
        raise InvalidRequest(
            "Last-Event-ID must be an event id this server sent (or a stream sequence)"
        )
    try:
        run_id = str(uuid.UUID(bytes=base64.urlsafe_b64decode(m["run"] + "==")))
    except ValueError:
        raise InvalidRequest("Last-Event-ID names no run") from None
    return Position(
        run_id,
        int(m["attempt"]),
        int(m["parts"]),
        int(m["seq"]),
        done=m["done"] is not None,
        text=f"t{m['text']}" if m["text"] else "" if m["none"] else None,
    )
