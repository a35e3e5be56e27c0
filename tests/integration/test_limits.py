"""Limits answer 413/429 JSON: body size, input length, queued runs per thread, attach streams."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from threadgate.api.limits import AttachLimiter
from threadgate.client import SseEvent, parse_sse
from threadgate.devstack import NatsServer
from threadgate.errors import ConfigError
from threadgate.settings import load_settings
from threadgate.streams.buffer import JetStreamBuffer, connect_nats

from tests.conftest import unique
from tests.integration.conftest import Pod
from tests.integration.knobs import AUTH_ON, key, pod_settings

pytestmark = pytest.mark.integration

SLOW = {"chunks": 2000, "delay_ms": 50}  # a run that lasts until it is cancelled


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body


def _limiter() -> AttachLimiter:
    """The pod's attach limiter (one app per process: DBOS allows no second one)."""
    found = [o for o in gc.get_objects() if isinstance(o, AttachLimiter)]
    assert len(found) == 1
    return found[0]


async def cancel_all(
    pod: Pod, thread: str, headers: dict[str, str] | None = None, *, wait: bool = False
) -> None:
    runs = (await pod.http.get(f"/threads/{thread}/runs", headers=headers or {})).json()["runs"]
    for run in runs:
        if run["status"] in ("pending", "running"):
            await pod.http.post(
                f"/threads/{thread}/runs/{run['run_id']}/cancel",
                headers=headers or {},
                params={"wait": "true"} if wait else {},
            )


# --- body size ---------------------------------------------------------------------------


async def test_body_over_content_length_is_413(pod: Pod) -> None:
    with pod_settings(pod, max_body_bytes=2048):
        body = json.dumps({"input": "x" * 3000}).encode()
        resp = await pod.http.post(
            f"/threads/{unique()}/runs", content=body, headers={"content-type": "application/json"}
        )
        assert_error(resp, 413, "payload_too_large")
        # Within the limit: accepted as usual; the pod serves on after a 413.
        ok = await pod.http.post(
            f"/threads/{unique()}/runs", json={"input": "y" * 1500, "model_options": {"chunks": 1}}
        )
        assert ok.status_code == 202, ok.text


async def test_streamed_body_over_limit_is_413(pod: Pod) -> None:
    """No Content-Length (chunked): the bytes are counted as they come."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"input": "'
        for _ in range(10):
            yield b"z" * 1024
        yield b'"}'

    with pod_settings(pod, max_body_bytes=4096):
        resp = await pod.http.post(
            f"/threads/{unique()}/runs",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert "content-length" not in resp.request.headers
        assert_error(resp, 413, "payload_too_large")


async def test_long_input_is_400(pod: Pod) -> None:
    with pod_settings(pod, max_input_chars=10):
        resp = await pod.http.post(f"/threads/{unique()}/runs", json={"input": "x" * 11})
        assert_error(resp, 400, "invalid_request")


# --- queued runs per thread --------------------------------------------------------------


async def test_queued_runs_per_thread_is_429(pod: Pod) -> None:
    thread = unique()
    url = f"/threads/{thread}/runs"
    with pod_settings(pod, max_queued_runs_per_thread=3):
        try:
            first = await pod.http.post(
                url,
                json={"input": "0", "model_options": SLOW},
                headers={"Idempotency-Key": "first"},
            )
            assert first.status_code == 202
            for i in (1, 2):
                resp = await pod.http.post(url, json={"input": str(i), "model_options": SLOW})
                assert resp.status_code == 202
            over = await pod.http.post(url, json={"input": "3", "model_options": SLOW})
            assert_error(over, 429, "too_many_requests")
            assert over.headers["retry-after"] == "1"
            # An idempotent repeat is not a new run: it is answered, not limited.
            repeat = await pod.http.post(
                url,
                json={"input": "0", "model_options": SLOW},
                headers={"Idempotency-Key": "first"},
            )
            assert repeat.status_code == 200
            assert repeat.json()["run_id"] == first.json()["run_id"]
            # Another thread is not affected.
            other = await pod.http.post(
                f"/threads/{unique()}/runs", json={"input": "x", "model_options": {"chunks": 1}}
            )
            assert other.status_code == 202
            # `interrupt` replaces the queue rather than growing it.
            interrupt = await pod.http.post(
                url,
                json={
                    "input": "now",
                    "multitask_strategy": "interrupt",
                    "model_options": {"chunks": 1},
                },
            )
            assert interrupt.status_code == 202
            runs = (await pod.http.get(url)).json()["runs"]
            assert len(runs) == 4
        finally:
            await cancel_all(pod, thread)


# --- attach streams ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_attach(
    pod: Pod, thread: str, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.Response]:
    async with pod.http.stream("GET", f"/threads/{thread}/attach", headers=headers or {}) as resp:
        if resp.status_code != 200:
            await resp.aread()
        yield resp


async def wait_released(lim: AttachLimiter, total: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while lim.total != total:  # noqa: ASYNC110 (the limiter has no event to wait on)
            await asyncio.sleep(0.02)


async def test_attach_per_principal_is_429(pod: Pod) -> None:
    lim = _limiter()
    base = lim.total
    with pod_settings(pod, **AUTH_ON, max_attach_per_principal=2):
        alice_thread, bob_thread = unique(), unique()
        for thread, who in ((alice_thread, "alice"), (bob_thread, "bob")):
            resp = await pod.http.post(
                f"/threads/{thread}/runs",
                json={"input": "x", "model_options": SLOW},
                headers=key(who),
            )
            assert resp.status_code == 202
        try:
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(2):
                    resp = await stack.enter_async_context(
                        open_attach(pod, alice_thread, key("alice"))
                    )
                    assert resp.status_code == 200
                assert lim.by_principal["alice"] == 2
                async with open_attach(pod, alice_thread, key("alice")) as third:
                    assert third.status_code == 429
                    assert third.json()["error"]["code"] == "too_many_requests"
                # Bob has his own allowance.
                async with open_attach(pod, bob_thread, key("bob")) as bobs:
                    assert bobs.status_code == 200
            # Closed streams give their slots back.
            await wait_released(lim, base)
            assert "alice" not in lim.by_principal
            async with open_attach(pod, alice_thread, key("alice")) as again:
                assert again.status_code == 200
        finally:
            await cancel_all(pod, alice_thread, key("alice"))
            await cancel_all(pod, bob_thread, key("bob"))
    await wait_released(lim, base)


async def test_attach_per_pod_is_429(pod: Pod) -> None:
    lim = _limiter()
    base = lim.total
    thread = unique()
    await pod.http.post(f"/threads/{thread}/runs", json={"input": "x", "model_options": SLOW})
    try:
        with pod_settings(pod, max_attach_per_pod=base + 2, max_attach_per_principal=1):
            async with open_attach(pod, thread) as a, open_attach(pod, thread) as b:
                # Auth off: one anonymous caller, so only the pod limit applies.
                assert a.status_code == b.status_code == 200
                async with open_attach(pod, thread) as c:
                    assert_error(c, 429, "too_many_requests")
    finally:
        await cancel_all(pod, thread)
    await wait_released(lim, base)


async def test_attach_slot_released_when_run_ends(pod: Pod) -> None:
    """The stream holds a slot while it is open; the server ends it after `done` (the client
    never hangs up) and gives the slot back while the client still holds its end."""
    lim = _limiter()
    base = lim.total
    thread = unique()
    await pod.client.post(thread, "hi", model_options={"chunks": 10, "delay_ms": 20})
    events: list[SseEvent] = []
    async with asyncio.timeout(30), open_attach(pod, thread) as resp:
        assert resp.status_code == 200
        async for ev in parse_sse(resp.aiter_lines()):
            if not events:
                assert lim.total == base + 1  # taken for as long as the stream is open
            events.append(ev)
        # The body ended by itself (its last chunk came from the server) while this side is
        # still inside its `async with`: the server closed the stream, after `done`.
        assert resp.is_stream_consumed
        assert [e.event for e in events][-1] == "done" and events[-1].data["status"] == "success"
        await wait_released(lim, base)


# --- active runs per principal and per pod (issue 20, item 3) ----------------------------


async def post_run(
    pod: Pod, thread: str, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    payload = {"input": "x", "model_options": SLOW, **body}
    return await pod.http.post(f"/threads/{thread}/runs", json=payload, headers=headers or {})


async def active_accepted_here(pod: Pod) -> int:
    """Runs this pod accepted that are still pending or running (earlier tests' included),
    once those being stopped have stopped (the count must not fall during a test)."""
    async with asyncio.timeout(30):
        while True:
            async with pod.runtime.db.pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) AS n, count(stop_requested) AS stopping"
                    " FROM threadgate.runs"
                    " WHERE accepted_by = %s AND status IN ('pending', 'running')",
                    (pod.settings.pod_name,),
                )
                row = await cur.fetchone()
            assert row is not None
            if not row["stopping"]:
                return int(row["n"])
            await asyncio.sleep(0.05)  # paces polling the runs being stopped


async def test_active_runs_per_principal_is_429(pod: Pod) -> None:
    """One principal cannot start without bound: 300 slow runs used to be accepted at once."""
    threads = [unique("p") for _ in range(4)]
    bobs = unique("b")
    with pod_settings(pod, **AUTH_ON, max_active_runs_per_principal=3):
        try:
            for t in threads[:3]:
                assert (await post_run(pod, t, key("alice"))).status_code == 202
            over = await post_run(pod, threads[3], key("alice"))
            assert_error(over, 429, "too_many_requests")
            assert over.headers["retry-after"] == "1"
            assert "3" in over.json()["error"]["message"]
            # Whatever the thread: an existing one of hers is no way around it.
            assert_error(await post_run(pod, threads[0], key("alice")), 429, "too_many_requests")
            # Someone else has an allowance of their own.
            assert (await post_run(pod, bobs, key("bob"))).status_code == 202
            # `interrupt` replaces a thread's active runs rather than adding to them.
            swap = await post_run(pod, threads[0], key("alice"), multitask_strategy="interrupt")
            assert swap.status_code == 202, swap.text
            # A run that ends gives its place back.
            await cancel_all(pod, threads[1], key("alice"), wait=True)
            resp = await post_run(pod, threads[3], key("alice"))
            assert resp.status_code == 202, resp.text
        finally:
            for t in threads:
                await cancel_all(pod, t, key("alice"), wait=True)
            await cancel_all(pod, bobs, key("bob"), wait=True)


async def test_active_runs_per_principal_hold_under_a_burst(pod: Pod) -> None:
    """Concurrent first POSTs on different threads (possibly on different pods) are counted
    under one lock per principal: exactly the limit is accepted."""
    threads = [unique("burst") for _ in range(30)]
    with pod_settings(pod, **AUTH_ON, max_active_runs_per_principal=5):
        try:
            answers = await asyncio.gather(*(post_run(pod, t, key("alice")) for t in threads))
            codes = sorted(r.status_code for r in answers)
            assert codes == [202] * 5 + [429] * 25, codes
        finally:
            for t in threads:
                await cancel_all(pod, t, key("alice"), wait=True)


async def test_active_runs_per_pod_is_429(pod: Pod) -> None:
    """Runs this pod accepted that are still active: the bound with auth off too (one
    anonymous caller), and on everyone at once."""
    threads = [unique("pod") for _ in range(12)]
    try:
        with pod_settings(pod, max_active_runs_per_pod=await active_accepted_here(pod) + 3):
            answers = await asyncio.gather(*(post_run(pod, t) for t in threads[:10]))
            codes = sorted(r.status_code for r in answers)
            assert codes == [202] * 3 + [429] * 7, codes
            over = await post_run(pod, threads[10])
            assert_error(over, 429, "too_many_requests")
            assert over.headers["retry-after"] == "1"
            for t in threads[:10]:
                await cancel_all(pod, t, wait=True)
            assert (await post_run(pod, threads[11])).status_code == 202
    finally:
        for t in threads:
            await cancel_all(pod, t, wait=True)


# --- a run's own timeout is capped by the server's ---------------------------------------


async def test_timeout_beyond_the_servers_is_400(pod: Pod) -> None:
    with pod_settings(pod, run_timeout_s=120):
        too_long = await post_run(pod, unique(), timeout_s=86_400, model_options={"chunks": 1})
        body = assert_error(too_long, 400, "invalid_request")
        assert "120" in body["error"]["message"]
        ok = await post_run(pod, unique(), timeout_s=120, model_options={"chunks": 1})
        assert ok.status_code == 202, ok.text
        shorter = await post_run(pod, unique(), timeout_s=0.5, model_options={"chunks": 1})
        assert shorter.status_code == 202, shorter.text


# --- the stream is bounded in bytes ------------------------------------------------------


async def test_the_stream_is_bounded_in_bytes(pod: Pod) -> None:
    assert pod.runtime.buffer is not None
    info = await pod.runtime.buffer.js.stream_info(pod.settings.stream_name)
    assert pod.settings.stream_max_bytes > 0
    assert info.config.max_bytes == pod.settings.stream_max_bytes
    assert info.config.max_age == pod.settings.stream_max_age_s


async def test_a_stream_the_server_has_no_room_for_names_the_setting(
    tmp_path: Path,
) -> None:
    """JetStream reserves max_bytes up front: a server with less room refuses the stream, and
    start-up says which setting to lower instead of a bare 'insufficient resources'."""
    server = NatsServer(tmp_path / "nats", max_file_store=64 * 1024**2)
    server.start()
    try:
        settings = load_settings(
            pod_name="room-0",
            nats_url=server.url,
            stream_name="ROOM",
            subject_prefix="room",
            stream_max_bytes=1024**3,
        )
        nc = await connect_nats(settings, "room-test")
        try:
            with pytest.raises(ConfigError, match="THREADGATE_STREAM_MAX_BYTES=1073741824"):
                await JetStreamBuffer(settings, nc).ensure_stream()
            small = settings.model_copy(update={"stream_max_bytes": 16 * 1024**2})
            await JetStreamBuffer(small, nc).ensure_stream()  # what the message advises fits
        finally:
            await nc.close()
    finally:
        server.stop()
