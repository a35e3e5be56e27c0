"""Issue 20, security second round: what a probe of the running product reached.

Each test here failed before its fix (the report says how each was seen failing).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from threadgate.client import AsyncClient
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.integration.conftest import Pod
from tests.integration.knobs import AUTH_ON, key, pod_settings

pytestmark = pytest.mark.integration

KNOWN_EVENTS = {"run_started", "reset", "chunk", "data", "stalled", "done"}


async def wait_status(
    client: AsyncClient, thread: str, run_id: str, *statuses: str, timeout: float = 30
) -> dict[str, Any]:
    """Poll the run until it reaches one of `statuses` (a deadline, not a sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        run = await client.run(thread, run_id)
        if run["status"] in statuses:
            return run
        assert loop.time() < deadline, f"run stuck in {run['status']}"
        await asyncio.sleep(0.02)


# --- 8. Last-Event-ID: ASCII digits only ---------------------------------------------------


@pytest.mark.parametrize(
    ("header", "query"),
    [
        (b"\xb2", None),  # latin-1 "²": str.isdigit() says yes, int() says no (was a 500)
        (None, "\u00b2"),  # the same as ?last_event_id=%C2%B2
        (None, "\uff11"),  # fullwidth 1: was taken as 1
        (None, "\u0663"),  # Arabic-Indic 3
        (b"-1", None),
        (b"+1", None),
        (None, " 1"),
        (b"1e3", None),
        (b"0x10", None),
        (b"1" * 20, None),  # more than 19 digits
        (None, "1_000"),  # int() takes underscores
    ],
)
async def test_last_event_id_takes_ascii_digits_only(
    pod: Pod, header: bytes | None, query: str | None
) -> None:
    thread = unique()
    await pod.client.post(thread, "hi", model_options={"chunks": 1})
    await pod.client.reply(thread)
    headers = {"Last-Event-ID": header} if header is not None else {}
    params = {"last_event_id": query} if query is not None else {}
    for path in (f"/threads/{thread}/attach", f"/ai-sdk/chat/{thread}/stream"):
        resp = await pod.http.get(path, headers=headers, params=params)
        assert resp.status_code == 400, (path, resp.status_code, resp.text)
        assert resp.json()["error"]["code"] == "invalid_request"
    # 19 ASCII digits are a sequence: past the run's end, nothing to send.
    ok = await pod.http.get(f"/threads/{thread}/attach", headers={"Last-Event-ID": "9" * 19})
    assert ok.status_code == 204


# --- 10. an event type read from JetStream is checked before it is an SSE line -------------


async def test_a_forged_event_type_never_becomes_an_sse_line(pod: Pod) -> None:
    """Anyone who can publish on the stream's subjects could write an event whose `type`
    went into the SSE `event:` line as it was: a newline in it forges frames for every
    client of the thread. Unknown types (and the two the attach endpoint makes itself) are
    dropped by the tail."""
    thread = unique()
    run = await pod.client.post(thread, "x", model_options={"chunks": 40, "delay_ms": 10})
    run_id = run["run_id"]
    await wait_status(pod.client, thread, run_id, "running")
    assert pod.runtime.buffer is not None
    js = pod.runtime.buffer.js
    subject = pod.settings.thread_subject(thread)
    forged = [
        {"type": "pwned\nevent: done\ndata: {}", "run_id": run_id, "attempt": 1},
        {"type": "reset", "run_id": run_id, "attempt": 1},  # the endpoint's own, not stored
        {"type": "stalled", "run_id": run_id, "attempt": 1, "executor": "nobody"},
        {"type": 7, "run_id": run_id, "attempt": 1},
    ]
    for body in forged:
        await js.publish(subject, json.dumps(body).encode())
    await wait_status(pod.client, thread, run_id, "success", "error")
    async with httpx.AsyncClient(base_url=pod.url, timeout=30) as http:
        text = (await http.get(f"/threads/{thread}/attach")).text
    events = [line.removeprefix("event: ") for line in text.splitlines() if line[:6] == "event:"]
    assert set(events) <= KNOWN_EVENTS, events
    assert "pwned" not in text and "nobody" not in text
    assert events.count("done") == 1 and "reset" not in events and "stalled" not in events
    reply = await pod.client.reply(thread)
    assert reply.text == mock_reply(40)


# --- 1. reads racing the first POST of a thread ---------------------------------------------

RACE_THREADS = 300
RACE_AT_ONCE = 10  # threads raced at the same time


@pytest.fixture
def auth_on(pod: Pod) -> Iterator[None]:
    with pod_settings(pod, **AUTH_ON):
        yield


@pytest.mark.long
async def test_reads_racing_a_threads_first_post_never_leak(pod: Pod, auth_on: None) -> None:
    """bob polls a thread's messages, runs, attach (at once and waiting for the first run)
    and the AI SDK resume route, each on its own connection, while alice makes the thread's
    first POST. The owner check and the read used to be two statements: bob read alice's
    messages, runs and reply stream in the window between them."""
    leaks: Counter[str] = Counter()  # reads that showed bob something of alice's
    leaked_threads: set[str] = set()
    reads: Counter[str] = Counter()
    bob = key("bob")
    limits = httpx.Limits(max_connections=1)
    clients = [
        httpx.AsyncClient(base_url=pod.url, timeout=30, limits=limits, headers=bob)
        for _ in range(5 * RACE_AT_ONCE)
    ]

    async def poll(
        http: httpx.AsyncClient, thread: str, path: str, kind: str, posted: asyncio.Event
    ) -> None:
        rounds_after = 0
        while rounds_after < 2:  # keep reading through the POST and a little after it
            if posted.is_set():
                rounds_after += 1
            reads[kind] += 1
            resp = await http.get(path)
            if kind in ("messages", "runs"):
                body = resp.json()
                if resp.status_code == 200 and (body.get("messages") or body.get("runs")):
                    leaks[kind] += 1
                    leaked_threads.add(thread)
            elif resp.status_code not in (204, 404):
                leaks[kind] += 1  # a stream (or anything but "none" and "not yours")
                leaked_threads.add(thread)

    async def wait_attach(http: httpx.AsyncClient, thread: str) -> None:
        reads["attach-wait"] += 1
        async with asyncio.timeout(20):
            async with http.stream("GET", f"/threads/{thread}/attach") as resp:
                text = (await resp.aread()).decode()
        if resp.status_code not in (200, 404) or "event:" in text:
            leaks["attach-wait"] += 1
            leaked_threads.add(thread)

    async def race(thread: str, mine: list[httpx.AsyncClient]) -> None:
        posted = asyncio.Event()
        waiting = asyncio.create_task(wait_attach(mine[4], thread))
        pollers = [
            asyncio.create_task(poll(http, thread, path, kind, posted))
            for http, (path, kind) in zip(
                mine[:4],
                [
                    (f"/threads/{thread}/messages", "messages"),
                    (f"/threads/{thread}/runs", "runs"),
                    (f"/threads/{thread}/attach?wait=false", "attach"),
                    (f"/ai-sdk/chat/{thread}/stream", "ai-sdk-resume"),
                ],
                strict=True,
            )
        ]
        await asyncio.sleep(0)  # let the pollers send their first requests
        resp = await pod.http.post(
            f"/threads/{thread}/runs",
            json={"input": "alice's secret", "model_options": {"chunks": 2}},
            headers=key("alice"),
        )
        assert resp.status_code == 202, resp.text
        posted.set()
        await asyncio.gather(*pollers, waiting)

    try:
        for batch in range(RACE_THREADS // RACE_AT_ONCE):
            threads = [unique(f"race{batch}") for _ in range(RACE_AT_ONCE)]
            await asyncio.gather(
                *(race(t, clients[5 * i : 5 * i + 5]) for i, t in enumerate(threads))
            )
    finally:
        for http in clients:
            await http.aclose()
    print(
        f"\n{RACE_THREADS} threads raced; bob's reads: {dict(reads)};"
        f" reads that leaked: {dict(leaks)}; threads leaked: {len(leaked_threads)}"
    )
    assert sum(leaks.values()) == 0, dict(leaks)
