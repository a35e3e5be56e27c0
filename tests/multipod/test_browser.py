"""The chat page in headless Chromium: a reply streams in, and survives the SIGKILL of its pod.

Needs Debian's `chromium` and `chromium-driver` (scripts/test installs them when it runs as
root); skipped, saying so, without them. Each test leaves a screenshot in
`artifacts/browser-<test>.png`.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import REPO, Cluster, Pod, running_on

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "artifacts"

pytestmark = [
    pytest.mark.multipod,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason=f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver "
        "(scripts/test does it when run as root)",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the [test] extra")

# Watches the page for as long as it lives: the most times any `chunk-i ` ever appeared at
# once in one reply (1 when nothing was ever shown twice) and how often a reply got shorter
# (a `reset` applied). Installed after load; the conversation list is never replaced.
OBSERVER = """
window.__seen = {maxRepeat: 0, shrinks: 0, lengths: {}};
const check = () => {
  for (const li of document.querySelectorAll('li.msg.assistant')) {
    const text = li.querySelector('.text').textContent;
    const counts = {};
    for (const m of text.matchAll(/chunk-\\d+ /g)) counts[m[0]] = (counts[m[0]] || 0) + 1;
    const top = Math.max(0, ...Object.values(counts));
    window.__seen.maxRepeat = Math.max(window.__seen.maxRepeat, top);
    const before = window.__seen.lengths[li.dataset.runId] || 0;
    if (text.length < before) window.__seen.shrinks += 1;
    window.__seen.lengths[li.dataset.runId] = text.length;
  }
};
new MutationObserver(check).observe(document.getElementById('messages'),
  {subtree: true, childList: true, characterData: true});
check();
"""

REPLY = """
const li = document.querySelector(`li.msg.assistant[data-run-id="${arguments[0]}"]`);
return li && {text: li.querySelector('.text').textContent, state: li.dataset.state,
              attempt: li.dataset.attempt, meta: li.querySelector('.meta').textContent};
"""


@pytest.fixture
def browser(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1000,760",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager is never asked to find or download anything.
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
        driver.save_screenshot(str(ARTIFACTS / f"browser-{name}.png"))
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


async def until(driver: Any, script: str, *args: Any, timeout: float = 30.0) -> Any:
    """Evaluate `script` in the page until it returns something truthy; that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value:
            return value
        if loop.time() > deadline:
            state = driver.execute_script(
                "return {status: document.getElementById('run-status').textContent,"
                " conn: document.getElementById('conn').textContent,"
                " error: document.getElementById('error').textContent,"
                " log: document.getElementById('messages').innerText}"
            )
            raise TimeoutError(f"page never satisfied {script!r}: {json.dumps(state)}")
        await asyncio.sleep(0.05)  # the page has no event to wait on from here: poll it


async def open_page(driver: Any, pod: Pod, thread: str, **model_options: int) -> None:
    query = "&".join(f"{k}={v}" for k, v in model_options.items())
    driver.get(f"{pod.url}/?thread={thread}&{query}")
    await until(
        driver,
        "return document.getElementById('thread-id').value === arguments[0]"
        " && document.getElementById('pod').textContent !== ''",
        thread,
    )
    driver.execute_script(OBSERVER)


async def send(driver: Any, text: str) -> str:
    """Type a message and send it with the page's button; the run id the page got back."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    run_id: str = await until(driver, "return document.getElementById('run-status').dataset.runId")
    return run_id


async def reply_at_least(driver: Any, run_id: str, chunks: int) -> None:
    await until(
        driver,
        f"const r = (() => {{ {REPLY} }})(); return r && r.text.includes('chunk-{chunks} ');",
        run_id,
    )


async def final_reply(driver: Any, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    await until(
        driver,
        "const s = document.getElementById('run-status');"
        " return s.dataset.runId === arguments[0] && s.dataset.state === 'success';",
        run_id,
        timeout=timeout,
    )
    reply: dict[str, Any] = driver.execute_script(REPLY, run_id)
    return reply


def assert_shown_once(driver: Any, run_id: str, chunks: int) -> None:
    """The reply's DOM text is the whole reply; the page never showed any chunk twice."""
    reply = driver.execute_script(REPLY, run_id)
    assert reply["text"] == mock_reply(chunks)
    assert reply["state"] == "success"
    bubbles = driver.execute_script(
        "return [...document.querySelectorAll('li.msg')]"
        ".map(li => [li.dataset.runId, li.dataset.role])"
    )
    assert bubbles == [[run_id, "user"], [run_id, "assistant"]]
    conversation = driver.execute_script("return document.getElementById('messages').textContent")
    for i in range(chunks):
        assert conversation.count(f"chunk-{i} ") == 1, (
            f"chunk-{i} shown {conversation.count(f'chunk-{i} ')} times"
        )
    seen = driver.execute_script("return window.__seen")
    assert seen["maxRepeat"] == 1, f"a chunk was on screen twice at some moment: {seen}"


@pytest.mark.cluster(size=2)
async def test_page_sends_a_message_and_shows_the_reply(cluster: Cluster, browser: Any) -> None:
    thread = unique("web")
    await open_page(browser, cluster.pods[0], thread, chunks=40, delay_ms=20)
    run_id = await send(browser, "hello from the browser")
    reply = await final_reply(browser, run_id)
    assert reply["text"] == mock_reply(40)
    assert_shown_once(browser, run_id, 40)
    # The history the page merged after `done` is the stored one: nothing added beside it.
    async with cluster.client() as client:
        stored = await client.messages(thread)
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "hello from the browser"),
        ("assistant", mock_reply(40)),
    ]
    # A fresh load of the thread shows the same conversation, once.
    await open_page(browser, cluster.pods[1], thread)
    await until(browser, REPLY, run_id)
    assert_shown_once(browser, run_id, 40)


CHUNKS = 60
SLOW = {"chunks": CHUNKS, "delay_ms": 50}  # 3 s of reply: time to kill its pod in the middle


@pytest.mark.cluster(size=2)
@pytest.mark.parametrize("page_on", ["executor", "survivor"])
async def test_page_shows_the_reply_once_when_the_executor_is_killed(
    cluster: Cluster, browser: Any, page_on: str
) -> None:
    """SIGKILL the pod running the reply mid-stream, restart it: the page ends with the reply,
    once. `executor`: the page's own pod dies, its EventSource reconnects with Last-Event-ID
    once the pod is back on its port; `survivor`: the page's pod lives and keeps streaming."""
    thread = unique("web")
    page_pod = cluster.pods[0]
    await open_page(browser, page_pod, thread, **SLOW)
    run_id = await send(browser, "survive this")
    async with cluster.client() as client:
        victim = await running_on(client, cluster, thread, run_id)
    # We cannot choose the executor: move the page (a reload mid-run) if it sits on the wrong pod.
    want = victim if page_on == "executor" else cluster.others(victim.name)[0]
    if want is not page_pod:
        page_pod = want
        await open_page(browser, page_pod, thread, **SLOW)
    await reply_at_least(browser, run_id, 10)
    await victim.kill()
    if page_on == "executor":
        await until(browser, "return document.getElementById('conn').dataset.state !== 'live'")
    await victim.restart()

    reply = await final_reply(browser, run_id)
    assert reply["text"] == mock_reply(CHUNKS)
    assert_shown_once(browser, run_id, CHUNKS)
    async with cluster.client() as client:
        run = await client.run(thread, run_id)
        stored = await client.messages(thread)
    assert run["status"] == "success" and run["attempt"] >= 2
    assert reply["attempt"] == str(run["attempt"])
    seen = browser.execute_script("return window.__seen")
    assert seen["shrinks"] >= 1, "the page never applied the replay's reset"
    assert [m["content"] for m in stored if m["role"] == "assistant"] == [mock_reply(CHUNKS)]
    await assert_recovery_is_visible(cluster, victim, run_id)


async def assert_recovery_is_visible(cluster: Cluster, victim: Pod, run_id: str) -> None:
    """The kill and its recovery read from the restarted pod's log and from /metrics alone."""
    lines = [json.loads(x) for x in victim.log_text().splitlines() if x.startswith("{")]
    recovering = [x for x in lines if x["msg"].startswith("recovering 1 runs")]
    assert [x["runs"] for x in recovering] == [[run_id]]
    replayed = [x for x in lines if x["msg"] == "run attempt replayed"]
    others = [
        json.loads(x)
        for p in cluster.others(victim.name)
        for x in p.log_text().splitlines()
        if x.startswith("{")
    ]
    replayed += [x for x in others if x["msg"] == "run attempt replayed"]
    assert [x["run_id"] for x in replayed] == [run_id]

    def samples(text: str) -> dict[str, float]:
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    async with httpx.AsyncClient(timeout=5) as http:
        scraped = {p.name: samples((await http.get(f"{p.url}/metrics")).text) for p in cluster.pods}
    assert scraped[victim.name]["threadgate_launch_recovered_runs_total"] == 1
    total = sum(m.get('threadgate_run_attempts_total{kind="replay"}', 0) for m in scraped.values())
    assert total == 1
    assert sum(m["threadgate_runs_recovered_total"] for m in scraped.values()) == 1
    finished = 'threadgate_runs_finished_total{status="success"}'
    assert sum(m.get(finished, 0) for m in scraped.values()) == 1


@pytest.mark.cluster(size=1)
async def test_page_controls_cancel_and_thread_ids(cluster: Cluster, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    pod = cluster.pods[0]
    thread = unique("web")
    await open_page(browser, pod, thread, chunks=400, delay_ms=50)
    run_id = await send(browser, "a long one")
    await reply_at_least(browser, run_id, 3)
    assert browser.find_element(By.ID, "send").get_attribute("disabled") is not None
    browser.find_element(By.ID, "cancel").click()
    await until(
        browser,
        "const s = document.getElementById('run-status');"
        " return s.dataset.runId === arguments[0] && s.dataset.state === 'cancelled';",
        run_id,
    )
    reply = browser.execute_script(REPLY, run_id)
    assert reply["state"] == "cancelled" and reply["meta"] == "cancelled"
    assert mock_reply(400).startswith(reply["text"]) and reply["text"]
    assert browser.find_element(By.ID, "send").get_attribute("disabled") is None
    assert browser.find_element(By.ID, "cancel").get_attribute("disabled") is not None
    async with cluster.client() as client:
        assert (await client.run(thread, run_id))["status"] == "cancelled"

    # A thread id that could not be a NATS subject token is refused in the page.
    field = browser.find_element(By.ID, "thread-id")
    field.clear()
    field.send_keys("not a.valid>id")
    browser.find_element(By.CSS_SELECTOR, "#thread-form button[type=submit]").click()
    assert field.get_attribute("aria-invalid") == "true"
    assert browser.find_element(By.ID, "error").is_displayed()
    # "New thread" makes a fresh, valid one, and the page shows its (empty) conversation.
    browser.find_element(By.ID, "new-thread").click()
    fresh = await until(
        browser,
        "const v = document.getElementById('thread-id').value;"
        " return v !== arguments[0] && /^[A-Za-z0-9_-]{1,128}$/.test(v) && v;",
        thread,
    )
    assert browser.execute_script("return document.querySelectorAll('li.msg').length") == 0
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert f"thread={fresh}" in browser.current_url
