"""`threadgate dev demo`: a pod dies mid-reply, and the reply goes on; what a client saw and
what was stored, side by side.

It posts a long `vary` reply (chunk i of attempt a reads `chunk-{i}.{a} `, so any mix or
duplicate shows) to a pod other than the page's (threadgate-0, whose chat page the banner
links), follows it through the page's pod as the page does, SIGKILLs the pod running it once
it streams (never the page's: the page must stay up to show the switch), and waits for the end.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import devstate
from .client import AsyncClient, Reply
from .devstate import DevError

CHUNK = re.compile(r"chunk-(\d+)\.(\d+) ")
TRIES = 3  # a run that landed on the page's pod is cancelled and posted again


@dataclass
class Seen:
    """What happened to the run, as the follower saw it, in order."""

    reply: Reply = field(default_factory=Reply)
    lines: list[str] = field(default_factory=list)
    streamed: asyncio.Event = field(default_factory=asyncio.Event)
    kill_at: int = 40


def spans(text: str) -> list[tuple[int, int, int]]:
    """The vary text as (attempt, first index, last index) runs, in order."""
    out: list[tuple[int, int, int]] = []
    for m in CHUNK.finditer(text):
        i, a = int(m.group(1)), int(m.group(2))
        if out and out[-1][0] == a and out[-1][2] == i - 1:
            out[-1] = (a, out[-1][1], i)
        else:
            out.append((a, i, i))
    return out


def indexes(text: str) -> list[int]:
    return [int(m.group(1)) for m in CHUNK.finditer(text)]


def verdict(seen: Reply, stored: str, chunks: int) -> tuple[bool, str]:
    """Whether the client got exactly the stored reply, each index once; how it went on."""
    order = indexes(seen.text)
    once = order == list(range(chunks)) and indexes(stored) == order
    if not once or seen.text != stored or seen.duplicates:
        return False, "MISMATCH: the client's reply and the stored one differ (a defect)"
    attempts = [a for a, _, _ in spans(stored)]
    if seen.resets == 0 and len(attempts) > 1:
        return True, "continued, exactly once"
    if seen.resets:
        return True, "regenerated (one reset, then the new attempt's whole reply), exactly once"
    return True, "one attempt only: the kill came after the reply (nothing to recover)"


def table(seen: Reply, stored: str, executors: dict[int, str], killed: str) -> list[str]:
    """The client's reply and the stored one, side by side."""

    def describe(text: str) -> list[str]:
        rows = []
        for a, first, last in spans(text):
            rows.append(f"chunk-{first}.{a} … chunk-{last}.{a}  ({last - first + 1})")
        return rows

    left, right = describe(seen.text), describe(stored)
    labels = []
    for a, _, _ in spans(stored):
        pod = executors.get(a, "?")
        labels.append(f"attempt {a} on {pod}{' (killed)' if pod == killed else ''}")
    width = max([len(r) for r in left] + [len("what the client saw")])
    label_w = max([len(x) for x in labels] + [len("resets, duplicates")])
    n_seen, n_stored = len(indexes(seen.text)), len(indexes(stored))
    same = "identical" if seen.text == stored else "DIFFERENT"
    rows = [("", "what the client saw", "the stored reply")]
    for k in range(max(len(left), len(right))):
        rows.append(
            (
                labels[k] if k < len(labels) else "",
                left[k] if k < len(left) else "",
                right[k] if k < len(right) else "",
            )
        )
    rows += [
        ("chunks", str(n_seen), str(n_stored)),
        ("resets, duplicates", f"{seen.resets}, {seen.duplicates}", "-"),
        ("text", f"{same} ({len(stored)} characters)", ""),
    ]
    lines = [f"  {a:<{label_w}}  {b:<{width}}  {c}".rstrip() for a, b, c in rows]
    return lines


async def _follow(client: AsyncClient, thread: str, seen: Seen, say: Callable[[str], None]) -> None:
    """The page's view of the run: through the page's pod, resuming with Last-Event-ID."""
    async for ev in client.events(thread, reconnects=120):
        seen.reply.apply(ev)
        d = ev.data
        if ev.event == "run_started" and int(d.get("attempt", 1)) > 1:
            how = (
                f"continues after {d['resume_from']} parts (resume_from), no reset"
                if d.get("resume_from") is not None
                else "regenerates the reply"
            )
            say(f"attempt {d['attempt']} began on {d.get('executor') or '?'}: it {how}")
        elif ev.event == "reset":
            say("reset: the partial reply is dropped, a regenerated attempt follows")
        elif ev.event == "stalled":
            say(f"{d.get('executor')} went away: the page says so (stalled) and waits")
        elif ev.event == "done":
            say(f"done: {d.get('status')}")
        if seen.reply.text.count("chunk-") >= seen.kill_at:
            seen.streamed.set()
    seen.streamed.set()


async def demo(
    state: Path,
    *,
    chunks: int = 200,
    delay_ms: float = 50,
    kill_at: int = 40,
    thread: str | None = None,
    timeout: float = 180,
    pause: Callable[[], None] | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Run the demo on the stack of `state`; 0 when the client's reply is exactly the stored
    one, each chunk once."""
    pods = devstate.pods(state)
    if len(pods) < 2:
        raise DevError(
            "the demo needs two pods or more (the page's pod stays up while another dies): "
            "start the stack with `threadgate dev --pods 3`",
            2,
        )
    if not 0 < kill_at < chunks:
        raise DevError(f"--kill-at must be between 1 and {chunks - 1} (--chunks {chunks})", 2)
    page, others = pods[0], pods[1:]
    thread = thread or f"demo-{secrets.token_hex(3)}"
    say(f"watch it live: {page.url}/?thread={thread}  (the page's pod, {page.name}, stays up)")
    if pause is not None:
        pause()
    options = {"chunks": chunks, "delay_ms": delay_ms, "vary": True}
    async with AsyncClient([page.url]) as watcher, AsyncClient([p.url for p in pods]) as api:
        for attempt in range(TRIES):
            poster = others[attempt % len(others)]
            async with AsyncClient([poster.url]) as post:
                run = await post.post(thread, "tell me a long story", model_options=options)
            say(f"posted a {chunks}-chunk reply to {poster.name} (run {run['run_id']})")
            seen = Seen(kill_at=kill_at)
            follower = asyncio.create_task(_follow(watcher, thread, seen, say))
            await asyncio.wait_for(seen.streamed.wait(), timeout)
            status = await api.run(thread, run["run_id"])
            if status["executor"] != page.name:
                break
            say(f"the run landed on {page.name}, the page's pod: cancelled, posting again")
            await api.cancel(thread, run["run_id"], wait=True)
            await asyncio.wait_for(follower, timeout)
        else:
            raise DevError(f"every run landed on {page.name}, the page's pod: try again", 1)
        victim = status["executor"]
        if follower.done():
            say("the reply ended before the kill: nothing to recover")
        else:
            killed = devstate.kill(state, victim, signal.SIGKILL)
            at = seen.reply.text.count("chunk-")
            say(f"SIGKILL to {victim} (pid {killed.pid}), which runs the reply, after {at} chunks")
        try:
            await asyncio.wait_for(follower, timeout)
        except TimeoutError:
            raise DevError(f"the run did not end within {timeout:.0f}s", 1) from None
        final = await api.run(thread, run["run_id"])
        messages = await api.messages(thread)
    stored = next(
        (
            m["content"]
            for m in messages
            if m["role"] == "assistant" and m["run_id"] == run["run_id"]
        ),
        "",
    )
    executors = {int(a["attempt"]): str(a.get("executor")) for a in final.get("attempts", [])}
    say("")
    for line in table(seen.reply, stored, executors, victim):
        say(line)
    ok, how = verdict(seen.reply, stored, chunks)
    say("")
    say(f"{'→' if ok else '✗'} {how}")
    return 0 if ok else 1


def run(state: Path, **kwargs: Any) -> int:
    """`threadgate dev demo`, from the CLI: asks to open the page first when at a terminal."""

    def pause() -> None:
        input("open it now, then press Enter to start ")

    if sys.stdin.isatty():
        kwargs.setdefault("pause", pause)
    return asyncio.run(demo(state, **kwargs))
