"""Resume exactly from anywhere (issue 24, contract v3): the seven sequences that ended with a
truncated, mixed or hung reply while `done` said success, each with real pods, JetStream and
PostgreSQL, on the native SSE route and (where it applies) the AI SDK route.

A client's place is its last event id; it comes back with it to any pod, one with no tail
for the thread included, and ends with exactly the stored reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import nats
import psycopg
import pytest
from threadgate.client import AsyncClient, SseEvent, parse_sse
from threadgate.models.mock import mock_reply

from tests.conftest import Stack, unique
from tests.multipod.cluster import Cluster, running_on, wait_run
from tests.multipod.conftest import StartCluster
from tests.plugins import unstorable_reply

pytestmark = pytest.mark.multipod

TERMINAL = ("success", "error", "cancelled", "interrupted")


class Contract:
    """A client written from the contract alone: a part must be the next index."""

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.status: str | None = None
        self.last_id: str | None = None
        self.events: list[SseEvent] = []

    def apply(self, ev: SseEvent) -> None:
        self.events.append(ev)
        if ev.id:
            self.last_id = ev.id
        d = ev.data
        if ev.event == "reset":
            self.parts.clear()
        elif ev.event == "run_started" and d.get("resume_from") is not None:
            del self.parts[d["resume_from"] :]
        elif ev.event in ("chunk", "data"):
            assert d["index"] == len(self.parts), f"part {d['index']} holding {len(self.parts)}"
            self.parts.append(d["text"] if ev.event == "chunk" else [d["name"], d["payload"]])
        elif ev.event == "done":
            self.status = d["status"]

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


async def read(
    url: str,
    thread: str,
    client: Contract,
    *,
    stop_after: int | None = None,
    params: dict[str, str] | None = None,
) -> int:
    """One attach from the client's place: its status code; it hangs up after `stop_after`
    more events (None: reads to `done`)."""
    headers = {"Last-Event-ID": client.last_id} if client.last_id else {}
    got = 0
    timeout = httpx.Timeout(30.0, read=60.0)
    async with (
        httpx.AsyncClient(timeout=timeout) as http,
        http.stream(
            "GET", f"{url}/threads/{thread}/attach", headers=headers, params=params
        ) as resp,
    ):
        if resp.status_code != 200:
            return resp.status_code
        async for ev in parse_sse(resp.aiter_lines()):
            client.apply(ev)
            got += 1
            if ev.event == "done" or (stop_after is not None and got >= stop_after):
                break
    return 200


async def stored(client: AsyncClient, thread: str, run_id: str) -> list[Any]:
    """The run's reply as stored, by parts as /messages gives them (text merged)."""
    for m in await client.messages(thread):
        if m["run_id"] == run_id and m["role"] == "assistant":
            # A text-only reply has no parts (its content is the whole of it).
            parts = m["parts"] or [{"type": "text", "text": m["content"]}]
            return [p["text"] if p["type"] == "text" else [p["name"], p["payload"]] for p in parts]
    return []


def merged(parts: list[Any]) -> list[Any]:
    out: list[Any] = []
    for p in parts:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        else:
            out.append(p)
    return out


# ---- 1. resume after a regeneration, on a pod with no tail ----------------------------------


@pytest.mark.cluster(size=3, tail_linger_s=0.2)
async def test_1_resume_after_a_regeneration_on_a_pod_with_no_tail(cluster: Cluster) -> None:
    thread = unique()
    opts = {"chunks": 120, "delay_ms": 25, "vary": True, "refuse_continue": True}
    async with cluster.client() as api:
        run_id = (await api.post(thread, "x", model_options=opts))["run_id"]
        victim = await running_on(api, cluster, thread, run_id)
        home = next(p for p in cluster.pods if p is not victim)
        elsewhere = next(p for p in cluster.pods if p not in (victim, home))
        client = Contract()
        assert await read(home.url, thread, client, stop_after=41) == 200
        assert len(client.parts) == 40
        await victim.kill()
        await victim.restart()
        final = await wait_run(api, thread, run_id, timeout=60)
        assert final["status"] == "success" and final["attempt"] >= 2
        # `elsewhere` never served this thread, and the victim is a new process: neither
        # has a tail for it.
        assert await read(elsewhere.url, thread, client) == 200
        assert "reset" in [e.event for e in client.events]
        assert client.text == final["output"] == mock_reply(120, {0: final["attempt"]})
        assert merged(client.parts) == await stored(api, thread, run_id)


@pytest.mark.cluster(size=3, tail_linger_s=0.2)
async def test_1_the_same_on_the_ai_sdk_route(cluster: Cluster) -> None:
    thread = unique()
    opts = {"chunks": 120, "delay_ms": 25, "vary": True, "refuse_continue": True}
    async with cluster.client() as api:
        run_id = (await api.post(thread, "x", model_options=opts))["run_id"]
        victim = await running_on(api, cluster, thread, run_id)
        home, elsewhere = [p for p in cluster.pods if p is not victim][:2]
        frames: list[dict[str, Any]] = []
        last_id = await ai_read(home.url, thread, run_id, None, frames, stop_after=30)
        await victim.kill()
        await victim.restart()
        final = await wait_run(api, thread, run_id, timeout=60)
        await ai_read(elsewhere.url, thread, run_id, last_id, frames)
        assert {"type": "reset-step"} in frames
        assert ui_text(frames) == final["output"]


async def ai_read(
    url: str,
    thread: str,
    run_id: str,
    last_id: str | None,
    into: list[dict[str, Any]],
    stop_after: int | None = None,
) -> str | None:
    """Read `/ai-sdk/chat/{t}/stream?run_id=` from `last_id`; the last id seen."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    got = 0
    frame_id: str | None = None
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=60.0)) as http,
        http.stream(
            "GET",
            f"{url}/ai-sdk/chat/{thread}/stream",
            params={"run_id": run_id},
            headers=headers,
        ) as resp,
    ):
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("id: "):
                frame_id = line[4:]
            elif line.startswith("data: ") and line != "data: [DONE]":
                into.append(json.loads(line[6:]))
                got += 1
            elif line == "" and frame_id is not None:
                # A batch ends with the frame that carries its id: hang up only there.
                last_id, frame_id = frame_id, None
                if stop_after is not None and got >= stop_after:
                    break
    return last_id


def ui_text(frames: list[dict[str, Any]]) -> str:
    """The text of the UIMessage the AI SDK's reader builds (reset-step drops the step)."""
    parts: list[dict[str, Any]] = []
    active: dict[str, dict[str, Any]] = {}
    for c in frames:
        t = c["type"]
        if t == "text-start":
            active[c["id"]] = {"text": ""}
            parts.append(active[c["id"]])
        elif t == "text-delta":
            active[c["id"]]["text"] += c["delta"]
        elif t == "reset-step":
            parts.clear()
            active.clear()
    return "".join(p["text"] for p in parts)


# ---- 2. Last-Event-ID at `done` on a pod with no tail --------------------------------------


@pytest.mark.cluster(size=2)
async def test_2_back_at_done_on_a_pod_with_no_tail_is_204_at_once(cluster: Cluster) -> None:
    thread = unique()
    async with cluster.client([cluster.pods[0]]) as api:
        run_id = (await api.post(thread, "x", model_options={"chunks": 5}))["run_id"]
        client = Contract()
        assert await read(cluster.pods[0].url, thread, client) == 200
        assert client.status == "success"
    async with httpx.AsyncClient(timeout=5) as http:  # 5 s: it used to stay 200 for good
        for path in (f"/threads/{thread}/attach", f"/ai-sdk/chat/{thread}/stream"):
            resp = await http.get(
                f"{cluster.pods[1].url}{path}",
                headers={"Last-Event-ID": client.last_id or ""},
                params={"run_id": run_id} if "ai-sdk" in path else None,
            )
            assert resp.status_code == 204, (path, resp.status_code)


# ---- 3 and 4. slow clients while the thread's next run purges and fills the tail -----------


@pytest.mark.cluster(size=1, tail_max_bytes=200_000)
async def test_3_a_slow_reader_of_a_long_reply_while_the_next_run_purges(cluster: Cluster) -> None:
    chunks = 20_000
    thread = unique()
    pod = cluster.pods[0]
    async with cluster.client() as api:
        first = (await api.post(thread, "x", model_options={"chunks": chunks, "delay_ms": 0}))[
            "run_id"
        ]
        await wait_run(api, thread, first, timeout=120)
        client = Contract()
        # It reads a little, then its socket stops draining while the next run purges the
        # subject and streams (its tail keeps ~200 KB: the rest is read from elsewhere).
        assert await read(pod.url, thread, client, stop_after=2000) == 200
        second = (await api.post(thread, "y", model_options={"chunks": 3000, "delay_ms": 0}))[
            "run_id"
        ]
        await wait_run(api, thread, second, timeout=120)
        assert await read(pod.url, thread, client) == 200
        assert client.status == "success"
        assert client.text == mock_reply(chunks) and len(client.parts) == chunks


@pytest.mark.cluster(size=1, tail_max_bytes=300_000)
async def test_4_a_slow_client_of_the_previous_run_when_the_next_fills_the_tail(
    cluster: Cluster,
) -> None:
    thread = unique()
    pod = cluster.pods[0]
    async with cluster.client() as api:
        first = await api.post(thread, "x", model_options={"chunks": 1900, "delay_ms": 0})
        await wait_run(api, thread, first["run_id"], timeout=60)
        slow = Contract()
        assert await read(pod.url, thread, slow, stop_after=10) == 200
        nxt = await api.post(thread, "y", model_options={"chunks": 4000, "delay_ms": 0})
        await wait_run(api, thread, nxt["run_id"], timeout=120)
        assert await read(pod.url, thread, slow) == 200
        assert slow.text == mock_reply(1900) and slow.status == "success"


# ---- 5. a stale `done` of an earlier run in the middle of the next --------------------------


@pytest.mark.cluster(size=2, tail_max_bytes=50_000)
async def test_5_late_attachers_of_the_next_run_despite_a_stale_done(
    cluster: Cluster, stack: Stack
) -> None:
    thread = unique()
    env = cluster.env
    subject = f"{env['THREADGATE_SUBJECT_PREFIX']}.thread.{thread}"
    async with cluster.client() as api:
        first = (await api.post(thread, "x", model_options={"chunks": 5}))["run_id"]
        await wait_run(api, thread, first)
        second = (await api.post(thread, "y", model_options={"chunks": 600, "delay_ms": 5}))[
            "run_id"
        ]
        await wait_run(api, thread, second, lambda r: r["status"] == "running")
        await asyncio.sleep(0.5)  # a few hundred parts in: the stale done lands mid-reply
        nc = await nats.connect(stack.nats.url)
        try:
            stale = {"type": "done", "run_id": first, "attempt": 2, "status": "error"}
            await nc.jetstream().publish(subject, json.dumps(stale).encode())
        finally:
            await nc.close()
        await wait_run(api, thread, second, timeout=60)
        for pod in cluster.pods:
            late = Contract()
            assert await read(pod.url, thread, late) == 200
            assert late.status == "success" and late.text == mock_reply(600)


@pytest.mark.cluster(size=2, adopt_check_s=0.5, heartbeat_s=0.2)
async def test_5_a_run_its_workflow_ended_without_us_publishes_nothing_once_the_next_began(
    cluster: Cluster,
) -> None:
    """An operator cancels a run's workflow in DBOS while its pod is down: the thread's next
    run starts, and the reconciler finishes the first one's row without a `done` in the
    middle of the second (it used to publish one)."""
    thread = unique()
    db = cluster.env["THREADGATE_DATABASE_URL"]
    async with cluster.client() as api:
        first = (await api.post(thread, "x", model_options={"chunks": 400, "delay_ms": 20}))[
            "run_id"
        ]
        victim = await running_on(api, cluster, thread, first)
        await victim.kill()  # and it stays down
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            await conn.execute(
                "UPDATE dbos.workflow_status SET status = 'CANCELLED' WHERE workflow_uuid = %s",
                (first,),
            )
    survivor = cluster.others(victim.name)[0]
    async with AsyncClient(survivor.url) as alive:
        second = (await alive.post(thread, "y", model_options={"chunks": 200, "delay_ms": 5}))[
            "run_id"
        ]
        ended = await wait_run(alive, thread, first, timeout=60)
        assert ended["status"] == "cancelled" and ended["output"] is None
        await wait_run(alive, thread, second, timeout=60)
        late = Contract()
        assert await read(survivor.url, thread, late) == 200
        assert late.text == mock_reply(200)
        # Nothing of the first run on the subject once the second began.
        events = await subject_events(cluster, thread)
        begun = next(
            i for i, e in enumerate(events) if e["type"] == "run_started" and e["run_id"] == second
        )
        assert not [e for e in events[begun:] if e["run_id"] == first]


async def subject_events(cluster: Cluster, thread: str) -> list[dict[str, Any]]:
    """Every event on a thread's subject now, in stream order."""
    env = cluster.env
    subject = f"{env['THREADGATE_SUBJECT_PREFIX']}.thread.{thread}"
    nc = await nats.connect(env["THREADGATE_NATS_URL"])
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject, stream=env["THREADGATE_STREAM_NAME"])
        out: list[dict[str, Any]] = []
        with contextlib.suppress(nats.errors.TimeoutError, asyncio.TimeoutError):
            while True:
                for msg in await sub.fetch(500, timeout=1):
                    out.append(json.loads(msg.data))
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


# ---- 6. a NUL in a reply ---------------------------------------------------------------------


@pytest.mark.cluster(size=2, model="tests.plugins:unstorable")
async def test_6_a_reply_postgresql_cannot_store_as_it_is_is_stored_as_clients_saw_it(
    cluster: Cluster,
) -> None:
    thread = unique()
    async with cluster.client() as api:
        run_id = (await api.post(thread, "x", model_options={"delay_ms": 100}))["run_id"]
        live = Contract()
        assert await read(cluster.pods[0].url, thread, live, stop_after=3) == 200
        assert await read(cluster.pods[1].url, thread, live) == 200  # back on the other pod
        final = await wait_run(api, thread, run_id)
        assert final["status"] == "success" and live.status == "success"
        want = [p if isinstance(p, str) else [p.name, p.payload] for p in unstorable_reply()]
        assert live.parts == want
        # Text read from one JSON string joins a high and a low surrogate that met across parts
        # into one character, as every JSON reader does: compare as such a reader would.
        text = "".join(p for p in want if isinstance(p, str))
        assert final["output"] == json.loads(json.dumps(text))
        assert json.loads(json.dumps(merged(live.parts))) == await stored(api, thread, run_id)
        # The thread goes on: its next run is not blocked by a row left `running`.
        nxt = (await api.post(thread, "y"))["run_id"]
        assert (await wait_run(api, thread, nxt))["status"] == "success"


# ---- 7. drain hand-offs are not crashes --------------------------------------------------------


@pytest.mark.cluster(size=1, drain_timeout_s=1, max_replays=2)
async def test_7_drain_hand_offs_never_end_a_run_as_crashed(cluster: Cluster) -> None:
    thread = unique()
    pod = cluster.pods[0]
    async with cluster.client() as api:
        run_id = (await api.post(thread, "x", model_options={"chunks": 400, "delay_ms": 25}))[
            "run_id"
        ]
        for _ in range(8):  # DBOS would dead-letter it at its 7th dispatch
            await wait_run(
                api,
                thread,
                run_id,
                lambda r: r["status"] == "running" and r["executor"] == pod.name,
            )
            assert await pod.term(timeout=30) == 0
            await pod.restart()
        final = await wait_run(api, thread, run_id, timeout=120)
        assert final["status"] == "success", final.get("error")
        client = Contract()
        assert await read(pod.url, thread, client) == 200
        assert client.text == final["output"] == mock_reply(400)


# ---- bounded tails ----------------------------------------------------------------------------


async def tails_and_consumers(pod_url: str, stack: Stack, stream: str) -> tuple[int, int]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{pod_url}/metrics")).text
    tails = next(
        int(float(line.split()[-1]))
        for line in text.splitlines()
        if line.startswith("threadgate_thread_tails ")
    )
    nc = await nats.connect(stack.nats.url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return tails, int(info.state.consumer_count)
    finally:
        await nc.close()


async def hang_ups(url: str, n: int, batch: int = 50) -> None:
    """`n` attaches to fresh thread ids, each hung up once its headers came."""

    async def one() -> None:
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream("GET", f"{url}/threads/{unique('h')}/attach") as resp,
        ):
            assert resp.status_code == 200

    for _ in range(0, n, batch):
        await asyncio.gather(*(one() for _ in range(batch)))


@pytest.mark.cluster(size=1)
async def test_a_thousand_hang_ups_leave_few_tails_and_consumers(
    cluster: Cluster, stack: Stack
) -> None:
    pod = cluster.pods[0]
    stream = cluster.env["THREADGATE_STREAM_NAME"]
    await hang_ups(pod.url, 1000)
    await asyncio.sleep(5)  # the bound is what is left 5 s after the last hang-up
    tails, consumers = await tails_and_consumers(pod.url, stack, stream)
    assert tails <= 50 and consumers <= 50, (tails, consumers)


async def test_lingering_tails_are_bounded_per_principal(
    start_cluster: StartCluster, stack: Stack
) -> None:
    """However long the linger, a principal keeps at most max_attach_per_principal idle
    tails on a pod."""
    cluster = await start_cluster(size=1, tail_linger_s=600, max_attach_per_principal=20)
    pod = cluster.pods[0]
    await hang_ups(pod.url, 300, batch=20)
    stream = cluster.env["THREADGATE_STREAM_NAME"]
    async with asyncio.timeout(30):  # the extra tails close as their clients' hang-ups arrive
        while max(counts := await tails_and_consumers(pod.url, stack, stream)) > 20:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # paces sampling the counts
    assert counts[0] <= 20 and counts[1] <= 20, counts
