"""Subject isolation: no thread id that could change a NATS subject gets past the API (400).

A thread's events live on `<prefix>.thread.<id>`: a `*`, `>` or `.` in an id would widen or
shift the subject. Every route refuses such ids before anything reaches NATS or Postgres; the
spy on the buffer's one subject function proves nothing reached NATS.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from urllib.parse import unquote

import pytest
from threadgate.ids import THREAD_ID_PATTERN

from tests.conftest import unique
from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration

RUN = "00000000-0000-4000-8000-000000000000"
BAD_IDS = [
    "*",
    ">",
    "a.b",
    "a.*",
    "a.>",
    "*.>",
    "%2E",  # "."
    "%2E%2E",  # ".."
    "%2e",
    "a%2Eb",
    "%2A",  # "*"
    "%3E",  # ">"
    "a%2E%3E",
    "%252E",  # double-encoded: arrives as "%2E", and `%` is refused too
    "\u0430",  # Cyrillic a (httpx sends it percent-encoded UTF-8)
    "thr\u0435ad",  # Cyrillic e inside a Latin word
    "\uff41",  # fullwidth a
    "a\u200bb",  # zero-width space
    "%E2%80%AE",  # right-to-left override
    "a%20b",
    "%20",
    "a%09b",
    "a%0A",
    "a%0D%0Ab",
    "%00",
    "a%00b",
    "a\\b",
    "x" * 129,
    "x" * 8000,
]


@pytest.fixture
def subjects_seen(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every thread id for which the buffer built a NATS subject during the test."""
    buffer = pod.runtime.buffer
    assert buffer is not None
    seen: list[str] = []
    original = buffer.subject

    def spy(thread_id: str) -> str:
        seen.append(thread_id)
        return original(thread_id)

    monkeypatch.setattr(buffer, "subject", spy)
    yield seen


def refused(seen: list[str]) -> list[str]:
    """The ids among `seen` that the API must refuse. Runs of earlier tests may still be
    finishing on this shared pod: their (valid) ids reach NATS meanwhile."""
    return [s for s in seen if not re.fullmatch(THREAD_ID_PATTERN, s)]


def routes(thread: str) -> list[tuple[str, str]]:
    return [
        ("POST", f"/threads/{thread}/runs"),
        ("GET", f"/threads/{thread}/runs"),
        ("GET", f"/threads/{thread}/runs/{RUN}"),
        ("POST", f"/threads/{thread}/runs/{RUN}/cancel"),
        ("GET", f"/threads/{thread}/messages"),
        ("GET", f"/threads/{thread}/attach"),
    ]


@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda b: repr(b[:12]))
async def test_bad_ids_never_reach_nats(pod: Pod, subjects_seen: list[str], bad: str) -> None:
    for method, path in routes(bad):
        body = {"input": "hi", "model_options": {"chunks": 1}} if method == "POST" else None
        resp = await pod.http.request(method, path, json=body)
        assert resp.status_code == 400, (method, path[:60], resp.status_code, resp.text[:200])
        assert resp.json()["error"]["code"] == "invalid_thread_id"
    assert refused(subjects_seen) == [] and bad not in subjects_seen
    if "\x00" not in unquote(bad):  # PostgreSQL text cannot even hold a NUL to look up
        assert not await pod.runtime.store.thread_exists(unquote(bad))
    assert unquote(bad) not in (pod.runtime.hub.tails if pod.runtime.hub else {})


async def raw_request(pod: Pod, method: str, target: str, body: bytes = b"") -> int:
    """One request with the target sent exactly as written (no client-side normalization)."""
    host, port = pod.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        await reader.read()
    finally:
        writer.close()
    return int(status_line.split()[1])


@pytest.mark.parametrize("segment", [".", "..", "*", ">", "a.b", "%2E", "%2A", "%3E"])
async def test_raw_targets_never_reach_nats(
    pod: Pod, subjects_seen: list[str], segment: str
) -> None:
    """Dot segments and wildcards as a client that does not normalize URLs sends them."""
    body = b'{"input": "hi", "model_options": {"chunks": 1}}'
    for method, path in routes(segment):
        status = await raw_request(pod, method, path, body if method == "POST" else b"")
        # `..` may also resolve to another route (404/405): never to a subject.
        assert status in (400, 404, 405), (method, path, status)
        if segment != "..":
            assert status == 400, (method, path, status)
    assert refused(subjects_seen) == []


async def test_good_ids_reach_their_own_subject(pod: Pod, subjects_seen: list[str]) -> None:
    thread = unique("Ok_id-")
    await pod.client.post(thread, "hi", model_options={"chunks": 2})
    reply = await pod.client.reply(thread)
    assert reply.status == "success"
    assert thread in subjects_seen
    assert all(re.fullmatch(THREAD_ID_PATTERN, t) for t in subjects_seen)


async def test_stream_holds_only_well_formed_subjects(pod: Pod) -> None:
    """After everything the suite has sent, every subject in the stream is one thread's."""
    thread = unique()
    await pod.client.post(thread, "hi", model_options={"chunks": 1})
    await pod.client.reply(thread)
    assert pod.runtime.buffer is not None
    js = pod.runtime.buffer.js
    info = await js.stream_info(pod.settings.stream_name, subjects_filter=">")
    subjects = info.state.subjects or {}
    assert f"{pod.settings.subject_prefix}.thread.{thread}" in subjects
    prefix = re.escape(pod.settings.subject_prefix)
    pattern = re.compile(rf"{prefix}\.thread\.[A-Za-z0-9_-]{{1,128}}")
    assert all(pattern.fullmatch(s) for s in subjects), [
        s for s in subjects if not pattern.fullmatch(s)
    ]
