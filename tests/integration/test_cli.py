"""The client CLI against a real pod: what it prints, one-line errors, and its exit statuses."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from threadgate import cli
from threadgate.client import RESTARTED
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.fakes.openai_server import serve_app as serve
from tests.integration.conftest import Pod
from tests.integration.knobs import AUTH_ON, KEYS, pod_settings
from tests.multipod.cluster import wait_run

pytestmark = pytest.mark.integration


@dataclass
class Result:
    code: int
    out: str
    err: str


async def tg(pod: Pod | str, *args: str, **env_vars: str) -> Result:
    """`threadgate ARGS --url <pod>` as a process (the pod runs on this test's event loop)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_")} | env_vars
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "threadgate.cli",
        *args,
        "--url",
        pod if isinstance(pod, str) else pod.url,
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
    assert r.code == cli.USAGE  # checked before anything is sent
    assert "'bad.id' is not a thread id" in one_line(r.err)
    r = await tg(pod, "post", unique(), "hi", "-o", "chunks=-1")
    assert r.code == cli.REFUSED
    assert one_line(r.err) == (
        "threadgate: model_options: chunks must be an integer from 0 to 100000"
        " (invalid_request, HTTP 400)"
    )


async def test_a_400_names_the_field_and_the_rule(pod: Pod) -> None:
    """They said `request body or parameters are invalid` for both."""
    r = await tg(pod, "post", unique(), "")
    assert r.code == cli.REFUSED
    assert one_line(r.err) == (
        "threadgate: input: String should have at least 1 character (invalid_request, HTTP 400)"
    )
    r = await tg(pod, "runs", unique(), "--limit", "0")
    assert r.code == cli.REFUSED
    assert one_line(r.err) == (
        "threadgate: limit (query parameter): Input should be greater than or equal to 1"
        " (invalid_request, HTTP 400)"
    )


async def test_messages_show_data_parts_and_errors(pod: Pod) -> None:
    thread = unique()
    ok = await tg(pod, "post", thread, "hi", "-o", "chunks=3", "-o", "data_every=2", "--attach")
    assert ok.code == cli.OK, ok
    # A data part first, then text, then data last: no blank line anywhere, one line break
    # before each data part that follows text.
    assert ok.out == 'chunk-0 \n[tick] {"i": 1, "attempt": 1}\nchunk-2 \n', ok.out
    first = await tg(pod, "post", unique(), "x", "-o", "chunks=2", "-o", "data_every=1", "--attach")
    assert first.out == ('[tick] {"i": 0, "attempt": 1}\n[tick] {"i": 1, "attempt": 1}\n'), (
        first.out
    )
    failed = await tg(pod, "post", thread, "fail", "-o", "fail=permanent", "--attach")
    assert failed.code == cli.RUN_ERROR
    text = await tg(pod, "messages", thread)
    assert text.code == cli.OK, text
    assert text.out.splitlines() == [
        "     user: hi",
        "assistant: chunk-0 ",
        '           [tick] {"i": 1, "attempt": 1}',
        "           chunk-2 ",
        "     user: fail",
        "assistant [error]: (no reply) model_permanent: mock model: permanent failure requested",
    ]


async def test_run_tells_continued_from_regenerated(pod: Pod) -> None:
    thread = unique()
    options = ["chunks=6", "delay_ms=20", "fail=transient", "fail_at=3", "fail_attempts=1"]
    args = [a for o in [*options, "vary=true"] for a in ("-o", o)]
    posted = await tg(pod, "post", thread, "hi", *args, "--attach", "--json")
    run_id = json.loads(posted.out)["run_id"]
    shown = await tg(pod, "run", thread, run_id)
    assert shown.code == cli.OK, shown
    assert shown.out.splitlines()[-1] == "  the reply: continued: parts 0..2 kept, then attempt 2's"
    thread = unique()
    args += ["-o", "refuse_continue=true"]
    posted = await tg(pod, "post", thread, "hi", *args, "--attach", "--json")
    run_id = json.loads(posted.out)["run_id"]
    shown = await tg(pod, "run", thread, run_id)
    assert shown.out.splitlines()[-1].startswith("  the reply: regenerated by attempt "), shown.out
    assert "continued after" not in shown.out, shown.out


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


async def test_an_interrupted_run_exits_7(pod: Pod) -> None:
    thread = unique()
    first = await pod.client.post(thread, "long", model_options={"chunks": 500, "delay_ms": 20})
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_")}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "threadgate.cli", "attach", thread, "--url", pod.url),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    # Following the first run (it printed a chunk of it): now another run interrupts it.
    assert (await asyncio.wait_for(proc.stdout.read(8), 60)).startswith(b"chunk-0")
    await pod.client.post(thread, "now", strategy="interrupt", model_options={"chunks": 1})
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == cli.RUN_STOPPED, err
    assert "was interrupted" in err.decode()
    assert (await pod.client.run(thread, first["run_id"]))["status"] == "interrupted"


async def test_a_server_error_exits_5() -> None:
    """Any 5xx: one line naming it, exit 5 (here a server that fails every request)."""

    async def fail(request: Request) -> Response:
        return JSONResponse({"error": {"code": "internal", "message": "boom"}}, status_code=500)

    app = Starlette(routes=[Route("/{path:path}", fail, methods=["GET", "POST"])])
    async with serve(app) as url:
        r = await tg(url, "runs", unique())
    assert r.code == cli.SERVER_ERROR, r
    assert "500" in one_line(r.err)


async def test_attach_wait_follows_the_threads_first_run(pod: Pod) -> None:
    thread = unique()
    before = await attachers(pod)
    waiting = asyncio.create_task(tg(pod, "attach", thread, "--wait"))
    # The run is posted once the command's attach is open and waiting (the pod counts it).
    async with asyncio.timeout(60):
        while await attachers(pod) <= before:
            assert not waiting.done(), waiting.result()
            await asyncio.sleep(0.05)
    await pod.client.post(thread, "first", model_options={"chunks": 3})
    r = await waiting
    assert r.code == cli.OK, r
    assert r.out == mock_reply(3) + "\n"


async def test_post_with_an_idempotency_key_makes_one_run(pod: Pod) -> None:
    thread = unique()
    args = ("post", thread, "once", "-o", "chunks=1", "--idempotency-key", "cli-k", "--json")
    a, b = await tg(pod, *args), await tg(pod, *args)
    assert a.code == b.code == cli.OK, (a, b)
    assert json.loads(a.out)["run_id"] == json.loads(b.out)["run_id"]
    other = await tg(pod, "post", thread, "other", "--idempotency-key", "cli-k")
    assert other.code == cli.REFUSED and "idempotency_mismatch" in one_line(other.err)
    assert len(await pod.client.runs(thread)) == 1


async def test_the_token_comes_from_the_flag_or_the_environment(pod: Pod) -> None:
    thread = unique()
    with pod_settings(pod, **AUTH_ON):
        refused = await tg(pod, "runs", thread)
        assert refused.code == cli.REFUSED and "401" in one_line(refused.err)
        by_flag = await tg(pod, "runs", thread, "--token", KEYS["alice"])
        assert by_flag.code == cli.OK, by_flag
        by_env = await tg(pod, "runs", thread, THREADGATE_TOKEN=KEYS["alice"])
        assert by_env.code == cli.OK, by_env
        wrong = await tg(pod, "runs", thread, "--token", "nope", THREADGATE_TOKEN=KEYS["alice"])
        assert wrong.code == cli.REFUSED  # the flag wins over the environment


async def test_cancel_no_wait_answers_before_the_run_has_stopped(pod: Pod) -> None:
    thread = unique()
    run = await pod.client.post(thread, "long", model_options={"chunks": 500, "delay_ms": 20})
    await wait_run(pod.client, thread, run["run_id"], lambda r: r["status"] == "running")
    r = await tg(pod, "cancel", thread, run["run_id"], "--no-wait", "--json")
    assert r.code == cli.OK, r
    assert json.loads(r.out)["status"] == "running"  # asked to stop, not stopped yet
    final = await wait_run(pod.client, thread, run["run_id"])
    assert final["status"] == "cancelled"


async def test_runs_limit(pod: Pod) -> None:
    thread = unique()
    ids = [
        (await pod.client.post(thread, f"{i}", model_options={"chunks": 1}))["run_id"]
        for i in range(3)
    ]
    r = await tg(pod, "runs", thread, "--limit", "2", "--json")
    assert r.code == cli.OK, r
    assert [x["run_id"] for x in json.loads(r.out)] == ids[:0:-1]  # the newest two, newest first


async def attachers(pod: Pod) -> float:
    """The pod's open attach streams (its `threadgate_active_attachers` gauge)."""
    text = (await pod.http.get("/metrics")).text
    line = next(x for x in text.splitlines() if x.startswith("threadgate_active_attachers "))
    return float(line.split()[1])
