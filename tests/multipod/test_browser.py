"""The chat page in headless Chromium: a reply streams in, survives the SIGKILL of its pod,
data events render, bad thread ids are refused, the layout holds.

Needs Debian's `chromium` and `chromium-driver` (scripts/test installs them when it runs as
root) and selenium: skipped without them, saying so — except with `CI` set, where a missing
browser fails the test (CI must not go green without the only test of the page). Each test
leaves a screenshot in `artifacts/browser-<test>.png`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unavailable, unique
from tests.multipod.cluster import REPO, Cluster, Pod, running_on

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "artifacts"

pytestmark = pytest.mark.multipod


def need_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium (the [test] extra)")
    if missing:
        unavailable(
            f"needs {', '.join(missing)}: apt-get install chromium chromium-driver"
            " (scripts/test does it when run as root)"
        )


# Watches the page for as long as it lives: the most times any chunk index ever appeared at
# once in one reply (1 when nothing was ever shown twice: `chunk-3 ` and `chunk-3.1 `, `chunk-3.2 `
# all count as index 3), how often a reply got shorter (a `reset` applied), and every notice
# the run status showed. Installed after load; the conversation list is never replaced.
OBSERVER = """
window.__seen = {maxRepeat: 0, shrinks: 0, shrunk: [], lengths: {}, notices: []};
const check = () => {
  for (const li of document.querySelectorAll('li.msg.assistant')) {
    const text = [...li.querySelectorAll('.text > span')].map(s => s.textContent).join('');
    const counts = {};
    for (const m of text.matchAll(/chunk-(\\d+)(?:\\.\\d+)? /g)) counts[m[1]] = (counts[m[1]] || 0) + 1;
    const top = Math.max(0, ...Object.values(counts));
    window.__seen.maxRepeat = Math.max(window.__seen.maxRepeat, top);
    const before = window.__seen.lengths[li.dataset.runId] || 0;
    if (text.length < before) {
      window.__seen.shrinks += 1;  // and what the bubble said then (for a failure's message)
      window.__seen.shrunk.push({from: before, to: text.slice(0, 80), at: performance.now(),
        attempt: li.dataset.attempt, meta: li.querySelector('.meta')?.textContent,
        conn: document.getElementById('conn')?.dataset.state});
    }
    window.__seen.lengths[li.dataset.runId] = text.length;
  }
  const status = document.getElementById('run-status').textContent;
  if (status.includes('went away') && !window.__seen.notices.includes(status)) {
    window.__seen.notices.push(status);
  }
};
const watch = {subtree: true, childList: true, characterData: true};
new MutationObserver(check).observe(document.getElementById('messages'), watch);
new MutationObserver(check).observe(document.getElementById('run-status'), watch);
check();
"""

# A reply as the page shows it: its text runs, its data blocks, its state.
REPLY = """
const li = document.querySelector(`li.msg.assistant[data-run-id="${arguments[0]}"]`);
return li && {
  text: [...li.querySelectorAll('.text > span')].map(s => s.textContent).join(''),
  data: [...li.querySelectorAll('.text > figure.data-part')].map(
    f => [f.dataset.name, JSON.parse(f.querySelector('pre').textContent)]),
  order: [...li.querySelector('.text').children].map(c => c.tagName.toLowerCase()),
  state: li.dataset.state, attempt: li.dataset.attempt,
  meta: li.querySelector('.meta').textContent};
"""


@pytest.fixture(autouse=True)
def browser_first() -> None:
    """Whether the browser is there is known before the test's cluster starts (autouse
    fixtures come first): a skip (or, under CI, a failure) costs no pods."""
    need_browser()


@pytest.fixture
def browser(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    need_browser()
    from selenium import webdriver
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, 404s
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


async def open_page(driver: Any, pod: Pod, thread: str, **model_options: Any) -> None:
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
        f"const r = (() => {{ {REPLY} }})(); return r && /chunk-{chunks}[. ]/.test(r.text);",
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


def assert_shown_once(driver: Any, run_id: str, expected: str) -> None:
    """The reply's DOM text is the whole reply; the page never showed any chunk twice."""
    reply = driver.execute_script(REPLY, run_id)
    assert reply["text"] == expected
    assert reply["state"] == "success"
    bubbles = driver.execute_script(
        "return [...document.querySelectorAll('li.msg')]"
        ".map(li => [li.dataset.runId, li.dataset.role])"
    )
    assert bubbles == [[run_id, "user"], [run_id, "assistant"]]
    conversation = driver.execute_script("return document.getElementById('messages').textContent")
    for word in expected.split():
        assert conversation.count(f"{word} ") == 1, f"{word} shown {conversation.count(word)} times"
    seen = driver.execute_script("return window.__seen")
    assert seen["maxRepeat"] == 1, f"a chunk was on screen twice at some moment: {seen}"


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.cluster(size=2)
async def test_page_sends_a_message_and_shows_the_reply(cluster: Cluster, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    thread = unique("web")
    await open_page(browser, cluster.pods[0], thread, chunks=40, delay_ms=20)
    # The Send button sits level with the text box: same top, same height (within a pixel).
    box, button = browser.execute_script(
        "return ['input', 'send'].map(id => document.getElementById(id).getBoundingClientRect())"
        ".map(r => ({top: r.top, height: r.height, center: r.top + r.height / 2}))"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    browser.find_element(By.ID, "compose").screenshot(str(ARTIFACTS / "browser-compose.png"))
    assert abs(box["top"] - button["top"]) <= 1, (box, button)
    assert abs(box["height"] - button["height"]) <= 1, (box, button)
    assert abs(box["center"] - button["center"]) <= 1, (box, button)

    run_id = await send(browser, "hello from the browser")
    reply = await final_reply(browser, run_id)
    assert reply["text"] == mock_reply(40)
    assert_shown_once(browser, run_id, mock_reply(40))
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
    assert_shown_once(browser, run_id, mock_reply(40))
    # Nothing failed to load (the favicon included) and nothing broke the CSP.
    assert console_errors(browser) == []
    async with httpx.AsyncClient(base_url=cluster.pods[0].url) as http:
        for path in ("/favicon.ico", "/static/favicon.svg", "/static/threadgate-client.js"):
            assert (await http.get(path)).status_code == 200, path


CHUNKS = 60
SLOW = {"chunks": CHUNKS, "delay_ms": 50}  # 3 s of reply: time to kill its pod in the middle


@pytest.mark.cluster(size=2)
@pytest.mark.parametrize("page_on", ["executor", "survivor"])
async def test_page_shows_the_reply_once_when_the_executor_is_killed(
    cluster: Cluster, browser: Any, page_on: str
) -> None:
    """SIGKILL the pod running the reply mid-stream, restart it: the page ends with the reply,
    once. `executor`: the page's own pod dies, the client reconnects with Last-Event-ID once the
    pod is back on its port; `survivor`: the page's pod lives and keeps streaming."""
    thread = unique("web")
    run_id, victim = await kill_mid_reply(cluster, browser, thread, page_on, SLOW)
    reply = await final_reply(browser, run_id)
    assert reply["text"] == mock_reply(CHUNKS)
    assert_shown_once(browser, run_id, mock_reply(CHUNKS))
    async with cluster.client() as client:
        run = await client.run(thread, run_id)
        stored = await client.messages(thread)
    assert run["status"] == "success" and run["attempt"] == 2
    assert reply["attempt"] == str(run["attempt"])
    assert [m["content"] for m in stored if m["role"] == "assistant"] == [run["output"]]
    assert run["output"] == mock_reply(CHUNKS)
    await assert_recovery_is_visible(cluster, victim, run_id)


@pytest.mark.cluster(size=2)
@pytest.mark.parametrize("mode", ["continued", "regenerated"])
@pytest.mark.parametrize("page_on", ["executor", "survivor"])
async def test_page_shows_exactly_the_stored_reply_with_vary_text(
    cluster: Cluster, browser: Any, page_on: str, mode: str
) -> None:
    """With `vary` any mix of attempts shows: the page ends showing exactly the stored reply —
    attempt-1 chunks then attempt-2 chunks when the run continues (nothing shown is taken
    back), all of the last attempt after one visible reset when it regenerates."""
    thread = unique("web")
    options: dict[str, Any] = {**SLOW, "vary": 1}
    if mode == "regenerated":
        options["refuse_continue"] = 1
    run_id, _ = await kill_mid_reply(cluster, browser, thread, page_on, options)
    reply = await final_reply(browser, run_id)
    async with cluster.client() as client:
        run = await client.run(thread, run_id)
    assert run["status"] == "success"
    assert reply["text"] == run["output"]
    assert_shown_once(browser, run_id, run["output"])
    seen = browser.execute_script("return window.__seen")
    if mode == "continued":
        assert run["attempt"] == 2
        assert re.fullmatch(r"(chunk-\d+\.1 )+(chunk-\d+\.2 )+", run["output"]), run["output"]
        assert run["output"].startswith("chunk-0.1 chunk-1.1 chunk-2.1 ")
        assert seen["shrinks"] == 0, f"a continuation took back text the page showed: {seen}"
    else:
        assert run["attempt"] == 2  # a refused continuation regenerates in the same attempt
        assert re.fullmatch(r"(chunk-\d+\.2 ){60}", run["output"]), run["output"]
        assert seen["shrinks"] == 1, (
            f"the page applied the regenerating attempt's reset once: {seen}"
        )
    assert reply["attempt"] == str(run["attempt"])


async def kill_mid_reply(
    cluster: Cluster, browser: Any, thread: str, page_on: str, options: dict[str, Any]
) -> tuple[str, Pod]:
    page_pod = cluster.pods[0]
    await open_page(browser, page_pod, thread, **options)
    run_id = await send(browser, "survive this")
    async with cluster.client() as client:
        victim = await running_on(client, cluster, thread, run_id)
    # We cannot choose the executor: move the page (a reload mid-run) if it sits on the wrong pod.
    want = victim if page_on == "executor" else cluster.others(victim.name)[0]
    if want is not page_pod:
        page_pod = want
        await open_page(browser, page_pod, thread, **options)
    await reply_at_least(browser, run_id, 10)
    await victim.kill()
    if page_on == "executor":
        await until(browser, "return document.getElementById('conn').dataset.state !== 'live'")
    await victim.restart()
    return run_id, victim


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


@pytest.mark.cluster(size=1, model="tests.js_stack:demo_source")
async def test_page_renders_data_events_in_order(cluster: Cluster, browser: Any) -> None:
    """A plug-in source's data events show as labelled blocks among the text, in the stream
    and again from the stored history."""
    thread = unique("web")
    await open_page(browser, cluster.pods[0], thread, chunks=7, delay_ms=20)
    run_id = await send(browser, "with data")
    reply = await final_reply(browser, run_id)
    expected_text = "chunk-0.1 chunk-2.1 chunk-3.1 chunk-5.1 chunk-6.1 "
    steps = [["step", {"i": 1, "attempt": 1}], ["step", {"i": 4, "attempt": 1}]]
    assert reply["text"] == expected_text
    assert reply["data"] == steps
    assert reply["order"] == ["span", "figure", "span", "figure", "span"]
    async with cluster.client() as client:
        run = await client.run(thread, run_id)
    assert run["output"] == expected_text
    # Reloaded from the history (`parts` of the stored message): the same blocks, same order.
    await open_page(browser, cluster.pods[0], thread)
    await until(browser, REPLY, run_id)
    again = browser.execute_script(REPLY, run_id)
    assert (again["text"], again["data"], again["order"]) == (
        reply["text"],
        reply["data"],
        reply["order"],
    )


@pytest.mark.cluster(size=2)
async def test_page_says_the_executor_went_away_until_the_replay_starts(
    cluster: Cluster, browser: Any
) -> None:
    """While the executor is dead the page says so; the next run_started clears it."""
    thread = unique("web")
    page_pod = cluster.pods[0]
    # 10 s of reply: the page may have to move to the other pod before the kill (a reload).
    longer = {**SLOW, "chunks": 200}
    await open_page(browser, page_pod, thread, **longer)
    run_id = await send(browser, "stall")
    async with cluster.client() as client:
        victim = await running_on(client, cluster, thread, run_id)
        if victim is page_pod:
            page_pod = cluster.others(victim.name)[0]
            await open_page(browser, page_pod, thread, **longer)
        await reply_at_least(browser, run_id, 5)
        status = (await client.run(thread, run_id))["status"]
        assert status == "running", f"the reply ended ({status}) before its pod could be killed"
    await victim.kill()
    notice = f"{victim.name} went away, resuming…"
    await until(
        browser,
        "return document.getElementById('run-status').textContent.includes(arguments[0])",
        notice,
        timeout=60,
    )
    await victim.restart()
    await final_reply(browser, run_id)
    assert notice not in browser.execute_script(
        "return document.getElementById('run-status').textContent"
    )
    assert any(notice in n for n in browser.execute_script("return window.__seen.notices"))


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

    # A bad id in the URL is refused with an error, not swapped for a random new thread.
    browser.get(f"{pod.url}/?thread=bad.id")
    error = await until(
        browser,
        "const e = document.getElementById('error'); return !e.hidden && e.textContent;",
    )
    assert "bad.id" in error and "not a thread id" in error
    field = browser.find_element(By.ID, "thread-id")
    assert field.get_attribute("value") == "bad.id"
    assert field.get_attribute("aria-invalid") == "true"
    assert "thread=bad.id" in browser.current_url
    assert browser.execute_script("return document.querySelectorAll('li.msg').length") == 0


@pytest.mark.cluster(size=1, auth="on", api_keys="alice:key-of-alice")
async def test_page_keeps_the_token_for_the_tab_only(cluster: Cluster, browser: Any) -> None:
    """With auth on, a pasted token makes the page work (EventSource via ?access_token=); it is
    kept in sessionStorage, never localStorage, and the page says what belongs there."""
    from selenium.webdriver.common.by import By

    pod = cluster.pods[0]
    thread = unique("web")
    browser.get(f"{pod.url}/?thread={thread}&chunks=5&delay_ms=10")
    await until(browser, "const e = document.getElementById('error'); return !e.hidden;")
    assert "token" in browser.find_element(By.ID, "error").text.lower()
    browser.find_element(By.CSS_SELECTOR, "details.settings summary").click()
    note = browser.find_element(By.ID, "token-note").text
    assert "sessionStorage" in note and "short-lived JWT" in note
    token = browser.find_element(By.ID, "token")
    token.send_keys("key-of-alice")
    browser.execute_script(
        "document.getElementById('token').dispatchEvent(new Event('change'))"
    )  # what leaving the field does
    await until(browser, "return document.getElementById('error').hidden")
    driver_storage = browser.execute_script(
        "return [sessionStorage.getItem('threadgate.token'),"
        " localStorage.getItem('threadgate.token')]"
    )
    assert driver_storage == ["key-of-alice", None]
    browser.execute_script(OBSERVER)
    run_id = await send(browser, "with a token")
    reply = await final_reply(browser, run_id)
    assert reply["text"] == mock_reply(5)


@pytest.mark.cluster(size=1)
async def test_page_shows_the_latest_history_and_earlier_pages_on_demand(
    cluster: Cluster, browser: Any
) -> None:
    """A long thread opens on its latest 50 messages; "Earlier messages" puts the older ones
    above them, in order, once each, and disappears when there are no more."""
    from selenium.webdriver.common.by import By

    thread = unique("web")
    async with cluster.client() as client:
        for i in range(30):  # 60 messages
            await client.post(thread, f"question {i}", model_options={"chunks": 1})
        await client.reply(thread)  # the last run: a thread's runs end in order
        stored = await client.messages(thread)
    shown = "return [...document.querySelectorAll('li.msg')].map(li => li.innerText)"
    await open_page(browser, cluster.pods[0], thread)
    await until(browser, "return document.querySelectorAll('li.msg').length === 50")
    older = browser.find_element(By.ID, "older")
    assert older.is_displayed()
    latest = browser.execute_script(shown)
    assert latest[-1].startswith("Assistant") and "question 29" in latest[-2]
    older.click()
    await until(browser, "return document.querySelectorAll('li.msg').length === 60")
    await until(browser, "return document.getElementById('older').hidden")
    texts = browser.execute_script(shown)
    users = [t for t in texts if t.startswith("You")]
    assert [int(re.search(r"question (\d+)", t)[1]) for t in users] == list(range(30))  # type: ignore[index]
    order = browser.execute_script(
        "return [...document.querySelectorAll('li.msg')].map(li => [li.dataset.runId, li.dataset.role])"
    )
    assert order == [[m["run_id"], m["role"]] for m in stored]
    assert console_errors(browser) == []
