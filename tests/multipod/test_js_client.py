"""The JavaScript client's node tests (clients/js/test), run from pytest so that `./scripts/test`
runs them: the reducer and transport unit tests, the client against real pods, and the Vercel
AI SDK's own reader against real pods (the pods come from `python -m tests.js_stack`).

Needs node >= 18 and npm (the first run installs clients/js's devDependencies with `npm ci`
from its package-lock.json); the AI SDK's tests run on node >= 22, which ai 7 requires
(tests/node.py brings it from the npm registry where the machine's node is older). Skipped,
saying so, without them — except with `CI` set, where a missing node fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import js_stack
from tests.conftest import TEMPLATE, Stack
from tests.multipod.cluster import REPO
from tests.node import AI_SDK_NODE, node, npm_ci

JS = REPO / "clients" / "js"


def need_node(minimum: int = 18) -> str:
    """node (of at least `minimum`; 22 for the AI SDK) with clients/js's packages installed."""
    found = node(minimum)
    npm_ci(JS)
    return found


def run_node(*files: str, minimum: int = 18, stack: Stack | None = None) -> None:
    """`node --test` on `files`; their pods (tests/js_stack.py) on `stack`'s servers."""
    node = need_node(minimum)
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
    run_node("aisdk.test.js", minimum=AI_SDK_NODE, stack=stack)  # ai 7 requires node >= 22


@pytest.mark.multipod
@pytest.mark.timeout(600)
def test_plugin_data_events_in_js_and_ai_sdk(stack: Stack) -> None:
    """[contract v2] A plug-in source's data events, in the JS client and the AI SDK's reader."""
    run_node("plugin.test.js", stack=stack)


@pytest.mark.unit
@pytest.mark.timeout(300)
def test_the_client_installs_as_the_docs_say(tmp_path: Path) -> None:
    """docs/clients.md's `npm install` lines, run as written (the checkout's path put in),
    in an empty project: both entry points import; the packed tarball holds what `files` says."""
    node_bin = node()
    doc = (REPO / "docs" / "clients.md").read_text()
    section = doc.split("## The JS client", 1)[1].split("\n## ", 1)[0]
    lines = [
        line.split("#", 1)[0].strip().replace("/path/to/threadgate", str(REPO))
        for line in section.splitlines()
        if line.startswith(("npm install ", "npm pack "))
    ]
    assert len(lines) == 3, lines  # the link, then the packed copy
    env = {**os.environ, "npm_config_audit": "false", "npm_config_fund": "false"}
    check = (
        "const c = await import('threadgate-client');"
        " const a = await import('threadgate-client/ai-sdk');"
        " console.log(JSON.stringify([typeof c.attach, typeof c.post, typeof c.reduce,"
        " typeof a.threadgateFetch]));"
    )
    for install in ([lines[0]], lines[1:]):
        project = tmp_path / f"project{len(install)}"
        project.mkdir()
        (project / "package.json").write_text('{"name": "app", "private": true, "type": "module"}')
        for line in install:
            done = subprocess.run(
                line.split(), cwd=project, env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, (line, done.stdout, done.stderr)
        out = subprocess.run(
            [node_bin, "--input-type=module", "-e", check],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout.strip() == '["function","function","function","function"]', out.stderr
    (tarball,) = (tmp_path / "project2").glob("threadgate-client-*.tgz")
    listed = subprocess.run(["tar", "tzf", tarball], capture_output=True, text=True, check=True)
    manifest = json.loads((JS / "package.json").read_text())
    assert sorted(listed.stdout.split()) == sorted(
        f"package/{f}" for f in [*manifest["files"], "package.json"]
    )
    for key in ("name", "version", "exports", "files", "engines", "license", "repository"):
        assert manifest.get(key), key
