"""The JavaScript client's node tests (clients/js/test), run from pytest so that `./scripts/test`
runs them: the reducer and transport unit tests, the client against real pods, and the Vercel
AI SDK's own reader against real pods (the pods come from `python -m tests.js_stack`).

Needs node >= 18 and npm (tests/node.py; `./scripts/test` installs them and clients/js's
devDependencies). Skipped, saying so, without them — except with `CI` set, where a missing node
fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import js_stack
from tests.conftest import TEMPLATE, Stack
from tests.multipod.cluster import REPO
from tests.node import need_node

JS = REPO / "clients" / "js"


def run_node(*files: str, stack: Stack | None = None) -> None:
    """`node --test` on `files`; their pods (tests/js_stack.py) on `stack`'s servers."""
    node = need_node(JS)
    env = {**os.environ, "THREADGATE_PYTHON": sys.executable}
    if stack is not None:
        env[js_stack.SHARED_PG] = stack.pg.url("postgres")
        env[js_stack.SHARED_TEMPLATE] = TEMPLATE
        env[js_stack.SHARED_NATS] = stack.nats.url
    proc = subprocess.run(
        [node, "--test", "--test-concurrency=1", *(f"test/{f}" for f in files)],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "not ok", "#"))]
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-200:])
        pytest.fail(f"node --test {' '.join(files)} failed:\n{tail}\n{proc.stderr[-3000:]}")
    # Shown with -rA / -s: which node tests ran and passed.
    print("\n".join(summary))
    # A test node skipped is one pytest would count as passed: none may be.
    skipped = [line for line in summary if line.startswith(("# skipped", "# todo"))]
    assert all(line.split()[-1] == "0" for line in skipped), "\n".join(summary)


@pytest.mark.unit
def test_the_page_serves_the_client_unchanged() -> None:
    """app/static/threadgate-client.js is clients/js/index.js: one source of the client rules."""
    page = (REPO / "app" / "static" / "threadgate-client.js").read_bytes()
    assert page == (JS / "index.js").read_bytes(), "run `npm run sync-page` in clients/js"


@pytest.mark.unit
@pytest.mark.timeout(300)
def test_js_reducer_and_transport() -> None:
    run_node("reducer.test.js", "sse.test.js", "page-copy.test.js")


@pytest.mark.long
@pytest.mark.multipod
@pytest.mark.timeout(900)
def test_js_client_against_pods(stack: Stack) -> None:
    run_node("client.test.js", stack=stack)


@pytest.mark.long
@pytest.mark.multipod
@pytest.mark.timeout(900)
def test_ai_sdk_reader_against_pods(stack: Stack) -> None:
    run_node("aisdk.test.js", stack=stack)


@pytest.mark.multipod
@pytest.mark.timeout(600)
def test_plugin_data_events_in_js_and_ai_sdk(stack: Stack) -> None:
    """[contract v2] A plug-in source's data events, in the JS client and the AI SDK's reader."""
    run_node("plugin.test.js", stack=stack)
