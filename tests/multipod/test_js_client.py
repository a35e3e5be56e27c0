"""The JavaScript client's node tests (clients/js/test), run from pytest so that `./scripts/test`
runs them: the reducer and transport unit tests, the client against real pods, and the Vercel
AI SDK's own reader against real pods (the pods come from `python -m tests.js_stack`).

Needs node >= 18 and npm (the first run installs clients/js's devDependencies with `npm ci`
from its package-lock.json); the tests that import `ai` 7 run on the Node 22 that
tests/third_party installs (tests/multipod/node.py). Skipped, saying so, without node or npm —
except with `CI` set, where that fails; a failed install fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.multipod.cluster import REPO
from tests.multipod.node import node22, node_on_path, npm_ci

JS = REPO / "clients" / "js"


def run_node(*files: str) -> None:
    npm_ci(JS)
    # The `ai` package (7) needs Node >= 22: its tests run on tests/third_party's Node 22.
    uses_ai = any("aisdk" in f or "plugin" in f for f in files)
    node = node22() if uses_ai else node_on_path(18)
    env = {**os.environ, "THREADGATE_PYTHON": sys.executable}
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
    # Shown with -rA / -s: which node tests ran, passed and were skipped (contract v2 pending).
    print("\n".join(summary))


@pytest.mark.unit
def test_the_page_serves_the_client_unchanged() -> None:
    """app/static/threadgate-client.js is clients/js/index.js: one source of the client rules."""
    page = (REPO / "app" / "static" / "threadgate-client.js").read_bytes()
    assert page == (JS / "index.js").read_bytes(), "run `npm run sync-page` in clients/js"


@pytest.mark.unit
@pytest.mark.timeout(300)
def test_js_reducer_and_transport() -> None:
    run_node("reducer.test.js", "sse.test.js", "page-copy.test.js")


@pytest.mark.multipod
@pytest.mark.timeout(900)
def test_js_client_against_pods() -> None:
    run_node("client.test.js")


@pytest.mark.multipod
@pytest.mark.timeout(900)
def test_ai_sdk_reader_against_pods() -> None:
    run_node("aisdk.test.js")


@pytest.mark.multipod
@pytest.mark.timeout(600)
def test_plugin_data_events_in_js_and_ai_sdk() -> None:
    """A plug-in source's data events, in the JS client and the AI SDK's reader."""
    run_node("plugin.test.js")
