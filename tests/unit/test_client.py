"""The Python client's reducer (contract v2) and what `attach` prints, from hand-made events."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from threadgate.client import (
    RESTARTED,
    AsyncClient,
    DataPart,
    Reply,
    SseEvent,
    TextPart,
    Unreachable,
    render,
    to_print,
)

pytestmark = pytest.mark.unit


def started(attempt: int, run: str = "r", resume_from: int | None = None) -> SseEvent:
    data: dict[str, Any] = {"run_id": run, "attempt": attempt}
    if resume_from is not None:
        data["resume_from"] = resume_from
    return SseEvent("run_started", data)


def chunk(attempt: int, index: int, text: str | None = None, run: str = "r") -> SseEvent:
    text = f"chunk-{index}.{attempt} " if text is None else text
    return SseEvent("chunk", {"run_id": run, "attempt": attempt, "index": index, "text": text})


def data(attempt: int, index: int, name: str, payload: Any, run: str = "r") -> SseEvent:
    body = {"run_id": run, "attempt": attempt, "index": index, "name": name, "payload": payload}
    return SseEvent("data", body)


def reset(attempt: int, run: str = "r") -> SseEvent:
    return SseEvent("reset", {"run_id": run, "attempt": attempt})


def done(status: str = "success", run: str = "r", **extra: Any) -> SseEvent:
    return SseEvent("done", {"run_id": run, "attempt": 1, "status": status, **extra})


def fold(*events: SseEvent) -> Reply:
    reply = Reply()
    for ev in events:
        reply.apply(ev)
    return reply


def texts(attempt: int, indexes: range) -> str:
    return "".join(f"chunk-{i}.{attempt} " for i in indexes)


def test_a_plain_run() -> None:
    reply = fold(started(1), chunk(1, 0), chunk(1, 1), done())
    assert reply.text == texts(1, range(2))
    assert (reply.run_id, reply.attempt, reply.status, reply.resets) == ("r", 1, "success", 0)


def test_reset_drops_the_partial_reply_and_the_regenerated_one_follows() -> None:
    reply = fold(started(1), chunk(1, 0), chunk(1, 1), chunk(1, 2), reset(2), started(2))
    assert reply.text == "" and reply.resets == 1 and reply.attempt == 2
    for ev in (chunk(2, 0), chunk(2, 1), done()):
        reply.apply(ev)
    assert reply.text == texts(2, range(2))
    assert reply.resets == 1


def test_a_new_attempt_without_resume_from_regenerates_even_if_the_reset_was_missed() -> None:
    reply = fold(started(1), chunk(1, 0), chunk(1, 1), started(2), chunk(2, 0), done())
    assert reply.text == texts(2, range(1))
    assert reply.resets == 1


def test_resume_from_keeps_the_first_k_chunks_and_continues() -> None:
    reply = fold(
        started(1), chunk(1, 0), chunk(1, 1), chunk(1, 2), started(2, resume_from=3), chunk(2, 3)
    )
    assert reply.text == texts(1, range(3)) + texts(2, range(3, 4))
    assert reply.resets == 0 and reply.resumes == 1


def test_resume_from_past_what_the_client_holds_drops_nothing() -> None:
    reply = fold(started(1), chunk(1, 0), started(2, resume_from=3))
    assert reply.text == texts(1, range(1)) and reply.resets == 0


def test_resume_from_drops_held_chunks_at_or_past_k() -> None:
    reply = fold(
        started(1),
        *(chunk(1, i) for i in range(5)),
        started(2, resume_from=2),
        chunk(2, 2),
        chunk(2, 3),
        done(),
    )
    assert reply.text == texts(1, range(2)) + texts(2, range(2, 4))
    assert sorted(reply.chunks) == [0, 1, 2, 3]
    assert reply.resets == 0 and reply.resumes == 1


def test_resume_from_zero_keeps_nothing() -> None:
    reply = fold(started(1), chunk(1, 0), started(2, resume_from=0), chunk(2, 0))
    assert reply.text == texts(2, range(1))


def test_stragglers_of_an_older_attempt_are_ignored() -> None:
    reply = fold(
        started(1),
        chunk(1, 0),
        reset(2),
        started(2),
        chunk(1, 1),  # published by the dead attempt, delivered late
        chunk(2, 0),
        started(1),  # and its start, seen again
        reset(1),
        chunk(2, 1),
    )
    assert reply.text == texts(2, range(2))
    assert reply.attempt == 2 and reply.resets == 1


def test_stragglers_after_a_resume_do_not_come_back() -> None:
    reply = fold(
        started(1),
        *(chunk(1, i) for i in range(4)),
        started(2, resume_from=2),
        chunk(1, 3),  # dropped by the resume; a late copy must stay dropped
        chunk(2, 2),
    )
    assert reply.text == texts(1, range(2)) + texts(2, range(2, 3))


def test_duplicate_chunks_across_reconnects_are_kept_once() -> None:
    # A reconnect without Last-Event-ID replays the run from its first event.
    first = [started(1), chunk(1, 0), chunk(1, 1)]
    reply = fold(*first, *first, chunk(1, 2), done())
    assert reply.text == texts(1, range(3))
    assert reply.duplicates == 2 and reply.resets == 0


def test_the_same_reset_replayed_after_a_reconnect_counts_once() -> None:
    reply = fold(started(1), chunk(1, 0), reset(2), reset(2), started(2), chunk(2, 0))
    assert reply.resets == 1 and reply.text == texts(2, range(1))


def test_data_events_share_the_index_sequence_and_become_ordered_parts() -> None:
    reply = fold(
        started(1),
        chunk(1, 0, "Looking "),
        chunk(1, 1, "it up. "),
        data(1, 2, "tool_call", {"name": "search", "q": "x"}),
        chunk(1, 3, "Found "),
        chunk(1, 4, "it."),
        data(1, 5, "citation", {"url": "u"}),
        done(),
    )
    assert reply.text == "Looking it up. Found it."
    assert reply.parts == [
        TextPart("Looking it up. "),
        DataPart("tool_call", {"name": "search", "q": "x"}),
        TextPart("Found it."),
        DataPart("citation", {"url": "u"}),
    ]
    assert render(reply) == (
        'Looking it up. \n[tool_call] {"name": "search", "q": "x"}\nFound it.\n[citation] {"url": "u"}\n'
    )


def test_data_parts_follow_resets_and_resumes_like_chunks() -> None:
    reply = fold(started(1), data(1, 0, "a", 1), chunk(1, 1), data(1, 2, "b", 2))
    reply.apply(started(2, resume_from=2))
    assert reply.parts == [DataPart("a", 1), TextPart(texts(1, range(1, 2)))]
    reply.apply(reset(3))
    assert reply.parts == []


def test_stalled_is_informational_and_cleared_by_the_next_attempt() -> None:
    reply = fold(started(1), chunk(1, 0), SseEvent("stalled", {"run_id": "r", "executor": "p-1"}))
    assert reply.stalled == "p-1" and reply.text == texts(1, range(1))
    reply.apply(started(2, resume_from=1))
    assert reply.stalled is None and reply.text == texts(1, range(1))


def test_the_next_run_starts_over() -> None:
    reply = fold(started(1), chunk(1, 0), done("error", error={"code": "x"}))
    reply.apply(started(1, run="s"))
    assert (reply.run_id, reply.text, reply.status, reply.error) == ("s", "", None, None)
    reply.apply(chunk(1, 0, "late", run="r"))  # the previous run's
    assert reply.text == ""


def test_done_ends_with_status_and_error() -> None:
    reply = fold(started(1), chunk(1, 0), done("error", error={"code": "model", "message": "m"}))
    assert reply.status == "error" and reply.error == {"code": "model", "message": "m"}


def test_to_print_extends_or_restarts() -> None:
    assert to_print("", "a") == ["a"]
    assert to_print("a", "ab") == ["b"]
    assert to_print("ab", "ab") == []
    assert to_print("ab", "") == [RESTARTED]
    assert to_print("ab", "x") == [RESTARTED, "x"]


def sse(*events: tuple[int | None, SseEvent]) -> bytes:
    out = []
    for eid, ev in events:
        head = f"id: {eid}\n" if eid is not None else ""
        out.append(f"{head}event: {ev.event}\ndata: {json.dumps(ev.data)}\n\n")
    return "".join(out).encode()


class Script:
    """Answers each attach request with the next body; remembers the requests."""

    def __init__(self, *bodies: bytes | int) -> None:
        self.bodies = list(bodies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = self.bodies.pop(0)
        if isinstance(body, int):
            return httpx.Response(body)
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


async def attach(script: Script, **kw: Any) -> tuple[list[str], Reply]:
    client = AsyncClient(["http://pod-0", "http://pod-1"])
    client.http = httpx.AsyncClient(transport=httpx.MockTransport(script))
    reply = Reply()
    async with client:
        printed = [p async for p in client.attach("t", reply=reply, **kw)]
    return printed, reply


async def test_attach_prints_a_regenerated_reply_after_a_marker() -> None:
    script = Script(
        sse(
            (1, started(1)),
            (2, chunk(1, 0)),
            (3, chunk(1, 1)),
            (None, reset(2)),
            (5, started(2)),
            (6, chunk(2, 0)),
            (7, chunk(2, 1)),
            (8, done()),
        )
    )
    printed, reply = await attach(script)
    assert printed == [
        texts(1, range(1)),
        texts(1, range(1, 2)),
        RESTARTED,
        texts(2, range(1)),
        texts(2, range(1, 2)),
    ]
    assert "".join(printed).split(RESTARTED)[-1] == reply.text == texts(2, range(2))


async def test_attach_prints_a_continued_reply_seamlessly() -> None:
    script = Script(
        sse((1, started(1)), (2, chunk(1, 0)), (3, chunk(1, 1)), (5, started(2, resume_from=2))),
        sse((6, chunk(2, 2)), (7, done())),  # after the connection dropped
    )
    printed, reply = await attach(script)
    assert RESTARTED not in printed
    assert "".join(printed) == reply.text == texts(1, range(2)) + texts(2, range(2, 3))
    # the reconnect went to the next pod and resumed after the last event it had
    assert [str(r.url.host) for r in script.requests] == ["pod-0", "pod-1"]
    assert script.requests[1].headers["last-event-id"] == "5"


async def test_attach_survives_a_replay_from_the_start() -> None:
    whole = [(1, started(1)), (2, chunk(1, 0)), (3, chunk(1, 1))]
    script = Script(sse(*whole[:2]), sse(*whole, (4, done())))
    printed, reply = await attach(script)
    assert "".join(printed) == reply.text == texts(1, range(2))
    assert reply.duplicates == 1


async def test_attach_without_waiting_on_a_thread_with_no_run() -> None:
    script = Script(204)
    printed, reply = await attach(script, wait=False)
    assert printed == [] and reply.run_id is None
    assert script.requests[0].url.params["wait"] == "false"


async def test_attach_gives_up_when_no_pod_ever_answers() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    client = AsyncClient(["http://pod-0"])
    client.http = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    async with client:
        with pytest.raises(Unreachable) as err:
            async for _ in client.attach("t", connect_retries=0):
                pass
    assert err.value.reason == "connection refused"
