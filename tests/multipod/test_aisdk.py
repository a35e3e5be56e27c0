"""The AI SDK example (examples/ai-sdk: the `ai` package's chat as a no-build page) in headless
Chromium, against real pods behind the example's own server: a reply, a reload mid-reply
(resume), and the SIGKILL of the pod running the reply.

Needs node >= 22 (ai 7's requirement; tests/node.py brings it from the npm registry where the
machine's node is older), npm (the first run installs the example's packages with `npm ci`)
and the browser of test_browser.py; skipped without them, failed with `CI` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from threadgate.devstack import free_port
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import REPO, Cluster, running_on, wait_run
from tests.multipod.test_browser import browser, browser_first  # noqa: F401 (fixtures)
from tests.node import AI_SDK_NODE, node, npm_ci

pytestmark = pytest.mark.multipod

EXAMPLE = REPO / "examples" / "ai-sdk"


def need_node() -> str:
    """node >= 22 (ai 7 requires it) with the example's locked packages installed."""
    found = node(AI_SDK_NODE)
    npm_ci(EXAMPLE)
    return found


@pytest.fixture(autouse=True)
def node_first() -> None:
    """node and the example's packages, checked before the test's cluster starts."""
    need_node()


@contextlib.asynccontextmanager
async def example_server(upstream: str) -> AsyncIterator[str]:
    """`node server.mjs` in front of a pod; its URL once it answers."""
    node = need_node()
    port = free_port()
    env = {**os.environ, "THREADGATE_URL": upstream, "PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        node,
        "server.mjs",
        cwd=EXAMPLE,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + 20, 0.02
        async with httpx.AsyncClient() as http:
            while True:
                if proc.returncode is not None:
                    out = (await proc.stdout.read()).decode() if proc.stdout else ""
                    raise RuntimeError(f"the example's server exited with {proc.returncode}: {out}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(url)).status_code == 200:
                        break
                if loop.time() > deadline:
                    raise TimeoutError("the example's server never answered")
                await asyncio.sleep(delay)  # paces polling the server's readiness
                delay = min(delay * 1.5, 0.25)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)


async def until(driver: Any, script: str, *args: Any, timeout: float = 30.0) -> Any:
    """Evaluate `script` in the example page until it returns something truthy; that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if loop.time() > deadline:
            state = driver.execute_script(
                "return {status: document.getElementById('status')?.textContent,"
                " log: document.getElementById('messages')?.innerText}"
            )
            raise TimeoutError(f"page never satisfied {script!r}: {state}")
        await asyncio.sleep(0.05)  # the page has no event to wait on from here: poll it


MESSAGE = """
const li = [...document.querySelectorAll('#messages li.assistant')].at(-1);
return li && {id: li.dataset.id,
              text: [...li.querySelectorAll('.text')].map(s => s.textContent).join(''),
              status: document.getElementById('status').dataset.status};
"""


async def page_reply(driver: Any, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The assistant message of `run_id` once the chat is `ready` again."""
    found: dict[str, Any] = await until(
        driver,
        f"const m = (() => {{ {MESSAGE} }})();"
        " return m && m.id === arguments[0] && m.status === 'ready' && m;",
        run_id,
        timeout=timeout,
    )
    return found


async def send(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()


async def latest_run(cluster: Cluster, thread: str, after: str | None = None) -> str:
    """The run the page just created (newer than `after`)."""
    async with cluster.client() as client:
        for _ in range(200):
            runs = await client.runs(thread)
            if runs and runs[0]["run_id"] != after:
                return str(runs[0]["run_id"])
            await asyncio.sleep(0.05)  # paces polling for the run the page created
    raise TimeoutError("the page created no run")


@pytest.mark.cluster(size=1)
async def test_example_page_sends_resumes_and_stops(cluster: Cluster, browser: Any) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    async with example_server(cluster.pods[0].url) as url:
        thread = unique("ai")
        browser.get(f"{url}/?chat={thread}&chunks=30&delay_ms=80")
        await until(browser, "return document.body.dataset.loaded")
        await send(browser, "hello from the AI SDK page")
        run_id = await latest_run(cluster, thread)
        reply = await page_reply(browser, run_id)
        async with cluster.client() as client:
            run = await wait_run(client, thread, run_id)
        assert reply["text"] == run["output"] == mock_reply(30)

        # A reload in the middle of a reply: the stored conversation, then the run resumed.
        await send(browser, "a slower one")
        second = await latest_run(cluster, thread, after=run_id)
        async with cluster.client() as client:
            await wait_run(client, thread, second, lambda r: r["status"] == "running")
        # The page shows the new run's message before it reloads.
        await until(
            browser,
            "return document.querySelector(`#messages li.assistant[data-id='${arguments[0]}']`)",
            second,
        )
        browser.get(f"{url}/?chat={thread}&chunks=30&delay_ms=80")
        again = await page_reply(browser, second)
        async with cluster.client() as client:
            run2 = await wait_run(client, thread, second)
        assert again["text"] == run2["output"]
        texts = browser.execute_script(
            "return [...document.querySelectorAll('#messages li')].map(li => [li.className,"
            " [...li.querySelectorAll('.text')].map(s => s.textContent).join('')])"
        )
        assert texts == [
            ["user", "hello from the AI SDK page"],
            ["assistant", run["output"]],
            ["user", "a slower one"],
            ["assistant", run2["output"]],
        ]

        # Stop cancels the run in threadgate; the stream ends with the run's `done`.
        browser.get(f"{url}/?chat={thread}&chunks=400&delay_ms=50")
        await until(browser, "return document.querySelectorAll('#messages li').length === 4")
        await send(browser, "a long one")
        third = await latest_run(cluster, thread, after=second)
        # The new run's own message streaming (the one before it also holds `chunk-3 `: a
        # Stop while the chat was still `submitted` did nothing, and the run ran to its end).
        await until(
            browser,
            f"const m = (() => {{ {MESSAGE} }})();"
            " return m && m.id === arguments[0] && m.status === 'streaming'"
            " && m.text.includes('chunk-3 ');",
            third,
        )
        # The page's stop handler does nothing unless the chat says `streaming` (chat.js).
        await until(
            browser, "return document.getElementById('status').dataset.status === 'streaming'"
        )
        browser.find_element(By.ID, "stop").click()
        async with cluster.client() as client:
            run3 = await wait_run(client, thread, third)
        assert run3["status"] == "cancelled"
        await until(browser, "return document.getElementById('status').dataset.status === 'ready'")
        # The stopped reply keeps what was shown of it, marked stopped ...
        stopped = browser.execute_script(
            "const li = document.querySelector(`#messages li.assistant[data-id='${arguments[0]}']`);"
            " return li && {stopped: li.dataset.stopped,"
            " text: [...li.querySelectorAll('.text')].map(s => s.textContent).join('')};",
            third,
        )
        assert stopped["stopped"] == "cancelled" and stopped["text"].startswith("chunk-0 chunk-1")
        # ... and a reload shows what threadgate stored for it, no more, no less: the partial
        # reply, marked stopped, once a cancelled run stores what its clients saw (this round,
        # the lead's change); no message while it stores none.
        browser.get(f"{url}/?chat={thread}")
        await until(browser, "return document.querySelectorAll('#messages li').length >= 5")
        async with cluster.client() as client:
            stored = [
                m for m in await client.messages(thread)
                if m["role"] == "assistant" and m["run_id"] == third
            ]  # fmt: skip
        shown = browser.execute_script(
            "return [...document.querySelectorAll(`#messages li.assistant[data-id='${arguments[0]}']`)]"
            ".map(li => [li.dataset.stopped || null,"
            " [...li.querySelectorAll('.text')].map(s => s.textContent).join('')]);",
            third,
        )
        assert shown == [[stored[0]["status"], stored[0]["content"]] for _ in stored[:1]]


@pytest.mark.cluster(size=2)
@pytest.mark.parametrize("behind", ["executor", "survivor"])
async def test_example_page_survives_the_executor_being_killed(
    cluster: Cluster,
    browser: Any,  # noqa: F811
    behind: str,
) -> None:
    """SIGKILL the pod running the reply, restart it: the page ends with the stored reply.
    `executor`: the example's server talks to the dying pod (the stream breaks, threadgateFetch
    resumes it with Last-Event-ID once the pod is back); `survivor`: the stream goes on."""
    thread = unique("ai")
    page = f"?chat={thread}&chunks=200&delay_ms=40&vary=1"  # 8 s: a reload fits in it
    async with contextlib.AsyncExitStack() as servers:
        url = await servers.enter_async_context(example_server(cluster.pods[0].url))
        browser.get(f"{url}/{page}")
        await until(browser, "return document.body.dataset.loaded")
        await send(browser, "survive this")
        run_id = await latest_run(cluster, thread)
        async with cluster.client() as client:
            victim = await running_on(client, cluster, thread, run_id)
        want = victim if behind == "executor" else cluster.others(victim.name)[0]
        if want is not cluster.pods[0]:
            # We cannot choose the executor: put the page behind the wanted pod (a reload,
            # which resumes the run).
            url = await servers.enter_async_context(example_server(want.url))
            browser.get(f"{url}/{page}")
        await until(
            browser,
            f"const m = (() => {{ {MESSAGE} }})(); return m && m.text.includes('chunk-10.1 ');",
        )
        await victim.kill()
        await victim.restart()
        reply = await page_reply(browser, run_id)
    async with cluster.client() as client:
        run = await wait_run(client, thread, run_id)
    assert run["status"] == "success" and run["attempt"] == 2
    assert re.fullmatch(r"(chunk-\d+\.1 )+(chunk-\d+\.2 )+", run["output"]), run["output"]
    assert reply["text"] == run["output"]


CHECK = """
import { problems } from "./requirements.mjs";
console.log(JSON.stringify(problems(process.argv[1], process.argv[2])));
"""


@pytest.mark.unit
@pytest.mark.parametrize(
    ("ai", "node_version", "expected"),
    [
        ("7.0.173", "22.9.0", []),
        (
            "6.0.333",
            "22.9.0",
            [
                "ai 6.0.333 is installed, threadgate needs ai 7 (ai 6's DefaultChatTransport"
                " rejects the reset-step chunk of a regenerated reply): run `npm ci` here"
            ],
        ),
        ("7.0.173", "20.20.2", ["node 20.20.2 is too old: ai 7 requires node >= 22"]),
    ],
)
def test_the_example_refuses_ai_6_and_old_node_in_one_line(
    tmp_path: Any, ai: str, node_version: str, expected: list[str]
) -> None:
    """ai 6 would end a regenerated reply in `error` (it rejects `reset-step`): the example's
    server says so and exits before serving anything."""
    found = node()
    (tmp_path / "ai").mkdir()
    (tmp_path / "ai" / "package.json").write_text(f'{{"name": "ai", "version": "{ai}"}}')
    out = subprocess.run(
        [found, "--input-type=module", "-e", CHECK, str(tmp_path), node_version],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected
