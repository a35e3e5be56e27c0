"""The client CLI against a real pod: what it prints, one-line errors, and its exit statuses."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass

import pytest
from threadgate import cli
from threadgate.client import RESTARTED
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration


@dataclass
class Result:
    code: int
    out: str
    err: str


async def tg(pod: Pod, *args: str) -> Result:
    """`threadgate ARGS --url <pod>` as a process (the pod runs on this test's event loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "threadgate.cli",
        *args,
        "--url",
        pod.url,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    result = Result(proc.returncode, out.decode(), err.decode())
    assert "Traceback" not in result.err, result.err
    return result


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("threadgate: "), err
    return lines[0]


async def test_post_and_attach_print_the_reply(pod: Pod) -> None:
    thread = unique()
    r = await tg(pod, "post", thread, "hello", "-o", "chunks=3", "-o", "delay_ms=5", "--attach")
    assert r.code == cli.OK, r
    assert r.out == mock_reply(3) + "\n"
    assert "accepted" in r.err
    again = await tg(pod, "attach", thread)
    assert again.code == cli.OK and again.out == mock_reply(3) + "\n"


async def test_json_output_for_scripts(pod: Pod) -> None:
    thread = unique()
    posted = await tg(pod, "post", thread, "hi", "--option", "chunks=2", "--json")
    assert posted.code == cli.OK, posted
    run_id = json.loads(posted.out)["run_id"]
    followed = await tg(pod, "attach", thread, "--json")
    reply = json.loads(followed.out)
    assert (reply["run_id"], reply["status"], reply["text"]) == (run_id, "success", mock_reply(2))
    assert reply["parts"] == [{"type": "text", "text": mock_reply(2)}]
    runs = json.loads((await tg(pod, "runs", thread, "--json")).out)
    assert [r["run_id"] for r in runs] == [run_id]
    messages = json.loads((await tg(pod, "messages", thread, "--json")).out)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "hi"),
        ("assistant", mock_reply(2)),
    ]
    text = await tg(pod, "messages", thread)
    assert text.out.splitlines() == ["     user: hi", f"assistant: {mock_reply(2)}"]


async def test_messages_and_runs_a_page_at_a_time(pod: Pod) -> None:
    thread = unique()
    for i in range(3):
        posted = await pod.client.post(thread, f"m{i}", model_options={"chunks": 1})
        await pod.client.reply(thread)
        assert posted["status"] == "pending"
    latest = await tg(pod, "messages", thread, "--limit", "2")
    assert latest.code == cli.OK, latest
    assert latest.out.splitlines() == ["     user: m2", f"assistant: {mock_reply(1)}"]
    cursor = latest.err.strip().removeprefix("older messages: --cursor ")
    older = await tg(pod, "messages", thread, "--limit", "2", "--cursor", cursor)
    assert older.out.splitlines() == ["     user: m1", f"assistant: {mock_reply(1)}"]
    everything = await tg(pod, "messages", thread)
    assert len(everything.out.splitlines()) == 6 and everything.err == ""
    runs = await tg(pod, "runs", thread, "--limit", "1", "--json")
    (newest,) = json.loads(runs.out)
    cursor = runs.err.strip().removeprefix("older runs: --cursor ")
    rest = json.loads((await tg(pod, "runs", thread, "--cursor", cursor, "--json")).out)
    assert len(rest) == 2 and newest["run_id"] not in {r["run_id"] for r in rest}
    bad = await tg(pod, "runs", thread, "--cursor", "nonsense")
    assert bad.code == cli.REFUSED and "invalid_cursor" in one_line(bad.err)


async def test_attach_to_a_thread_without_a_run_says_so(pod: Pod) -> None:
    r = await tg(pod, "attach", unique())
    assert r.code == cli.REFUSED and r.out == ""
    assert "has no run" in one_line(r.err)


async def test_a_refused_request_is_one_line_and_exit_4(pod: Pod) -> None:
    r = await tg(pod, "post", "bad.id", "hi")
    assert r.code == cli.REFUSED
    assert "invalid_thread_id, HTTP 400" in one_line(r.err)
    r = await tg(pod, "post", unique(), "hi", "-o", "chunks=-1")
    assert r.code == cli.REFUSED and "HTTP 400" in one_line(r.err)


async def test_a_run_that_ends_in_error_exits_6(pod: Pod) -> None:
    r = await tg(pod, "post", unique(), "hi", "-o", "fail=permanent", "--attach")
    assert r.code == cli.RUN_ERROR
    assert "ended in error" in r.err.strip().splitlines()[-1]


async def test_cancel_and_a_cancelled_run_exits_7(pod: Pod) -> None:
    thread = unique()
    run = await pod.client.post(thread, "long", model_options={"chunks": 500, "delay_ms": 20})
    r = await tg(pod, "cancel", thread, run["run_id"])
    assert r.code == cli.OK, r
    assert r.out.strip() == f"run {run['run_id']}: cancelled"
    followed = await tg(pod, "attach", thread)
    assert followed.code == cli.RUN_STOPPED
    assert "was cancelled" in followed.err
    again = await tg(pod, "cancel", thread, run["run_id"])
    assert again.code == cli.REFUSED and "HTTP 409" in one_line(again.err)


async def test_strategies(pod: Pod) -> None:
    thread = unique()
    first = await pod.client.post(thread, "long", model_options={"chunks": 500, "delay_ms": 20})
    busy = await tg(pod, "post", thread, "next", "--strategy", "reject")
    assert busy.code == cli.REFUSED and "thread_busy" in one_line(busy.err)
    r = await tg(
        pod, "post", thread, "now", "--strategy", "interrupt", "-o", "chunks=1", "--attach"
    )
    assert r.code == cli.OK and r.out == mock_reply(1) + "\n"
    assert (await pod.client.run(thread, first["run_id"]))["status"] == "interrupted"


async def test_a_regenerated_reply_is_printed_after_a_marker(pod: Pod) -> None:
    """A transient failure at chunk 3 retries the run; the source refuses to continue, so
    attempt 3 regenerates it (with `vary`, different text). The CLI attaches right after its
    POST, long before the failure."""
    thread = unique()
    options = ["chunks=6", "delay_ms=100", "fail=transient", "fail_at=3", "fail_attempts=1"]
    args = [a for o in [*options, "vary=true", "refuse_continue=true"] for a in ("-o", o)]
    r = await tg(pod, "post", thread, "hi", *args, "--attach")
    assert r.code == cli.OK, r
    assert RESTARTED in r.out, r.out
    before, after = r.out.split(RESTARTED)
    stored = [m["content"] for m in await pod.client.messages(thread) if m["role"] == "assistant"]
    assert after == stored[0] + "\n"
    assert before.startswith("chunk-0") and len(before.split()) <= 3


async def test_a_continued_reply_prints_on_seamlessly(pod: Pod) -> None:
    """The same failure, with a source that continues: attempt 1's chunks, then attempt 2's,
    each printed once, no marker."""
    thread = unique()
    options = ["chunks=6", "delay_ms=50", "fail=transient", "fail_at=3", "fail_attempts=1"]
    args = [a for o in [*options, "vary=true"] for a in ("-o", o)]
    r = await tg(pod, "post", thread, "hi", *args, "--attach")
    assert r.code == cli.OK, r
    assert RESTARTED not in r.out
    assert r.out == "chunk-0.1 chunk-1.1 chunk-2.1 chunk-3.2 chunk-4.2 chunk-5.2 \n"
