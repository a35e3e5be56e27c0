"""Fuzzing the pod: no answer is ever a 5xx.

Three parts: schemathesis against the pod's own OpenAPI schema (every answer as documented);
a hypothesis fuzz of every route with what no schema describes (odd JSON, numbers, strings,
headers, credentials; see "hypothesis" below), under each kind of reply source; and each
option of each source alone with odd values of every kind. Seeded; THREADGATE_FUZZ_EXAMPLES
makes the last two longer.

Schemathesis: the `st` CLI runs as a subprocess (the pod serves on this test's event loop, so the fuzzer
must not block it), with auth on, from a fixed seed and a small example budget so that it
stays well under a minute. Checks: everything schemathesis has, except
- positive_data_acceptance: the API is stricter than JSON Schema can say about free-form
  fields (no NUL or lone surrogates anywhere in model_options, no blank input), so some
  schema-valid bodies are rightly refused with 400;
- allow_header_conformance: Starlette's 405 lists the methods of the first matching route
  only (GET and POST of /threads/{id}/runs are two routes).
For a longer hunt: `st run http://127.0.0.1:8000/openapi.json --max-examples 200 ...` against
`threadgate dev` (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisDeprecationWarning
from threadgate.models.mock import MOCK_OPTIONS
from threadgate.models.openai import KNOWN_OPTIONS
from threadgate.registry import load_source

from tests.fakes.openai_server import serve_fake
from tests.integration.conftest import Pod
from tests.integration.knobs import AUTH_ON, KEYS, jwt_token, pod_settings

pytestmark = pytest.mark.integration

ST = Path(sys.executable).with_name("st")
SEED = 20261123
MAX_EXAMPLES = 10


@pytest.mark.long
async def test_schemathesis(pod: Pod, tmp_path: Path) -> None:
    args = [
        str(ST),
        "run",
        f"{pod.url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance,allow_header_conformance",
        "--header",
        f"Authorization: Bearer {KEYS['alice']}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--request-timeout",
        "10",
        # One worker: hypothesis describing strategies from several threads at once trips
        # CPython 3.11's "AST constructor recursion depth mismatch" inside schemathesis.
        "--workers",
        "1",
    ]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    with pod_settings(pod, **AUTH_ON):
        loop = asyncio.get_running_loop()
        started = loop.time()
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=tmp_path,  # its .hypothesis/ and any report stay out of the repo
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 110)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        elapsed = loop.time() - started
        await cancel_fuzz_runs(pod)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-15000:]
    assert "generated" in text and "passed" in text, text[-3000:]
    # A figure, not a bound (a busy 2-core machine stretches it): the wait_for above is what
    # stops a hang.
    print(f"\nschemathesis: {MAX_EXAMPLES} examples per operation in {elapsed:.0f}s")


async def cancel_fuzz_runs(pod: Pod) -> None:
    """Fuzzed runs may be long: stop them, or the pod's drain would wait for them at the end."""
    async with pod.runtime.db.pool.connection() as conn:
        cur = await conn.execute(
            """SELECT r.thread_id, r.run_id FROM threadgate.runs r
               JOIN threadgate.threads t ON t.thread_id = r.thread_id
               WHERE t.owner = 'alice' AND r.status IN ('pending', 'running')"""
        )
        rows = await cur.fetchall()
    assert pod.runtime.runner is not None
    for row in rows:
        with contextlib.suppress(Exception):  # finished meanwhile
            await pod.runtime.runner.cancel(row["thread_id"], row["run_id"])


# What the fuzzer found, kept as plain regressions (each was a 500 before it was fixed).


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"input": "x", "model_options": {"k": "a\u0000b"}}',  # jsonb cannot hold NUL
        rb'{"input": "x", "model_options": {"\u0000": 1}}',
        rb'{"input": "x", "model_options": {"k": ["\ud800"]}}',  # a lone surrogate
        rb'{"input": "x", "model_options": {"\udfff": 1}}',
        b'{"input": "x", "model_options": ' + b'{"a": ' * 40 + b"1" + b"}" * 41,
    ],
    ids=["nul-value", "nul-key", "surrogate-value", "surrogate-key", "deep"],
)
async def test_unstorable_model_options_are_400(pod: Pod, raw: bytes) -> None:
    resp = await pod.http.post(
        "/threads/fuzz-found/runs", content=raw, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_request"


async def test_page_cursor_beyond_bigint_is_400(pod: Pod) -> None:
    resp = await pod.http.get("/threads/fuzz-found/runs", params={"before": 2**63})
    assert resp.status_code == 400, resp.text
    ok = await pod.http.get("/threads/fuzz-found/runs", params={"before": 2**63 - 1})
    assert ok.status_code == 200


@pytest.mark.parametrize("bad", [b"a\x01b", b"tab\there", b"\x7f", b"caf\xe9"])
async def test_idempotency_key_must_be_printable_ascii(pod: Pod, bad: bytes) -> None:
    resp = await pod.http.post(
        "/threads/fuzz-found/runs", json={"input": "x"}, headers={"Idempotency-Key": bad}
    )
    assert resp.status_code == 400, resp.text


async def test_metrics_are_documented_as_text(pod: Pod) -> None:
    spec = (await pod.http.get("/openapi.json")).json()
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    thread = spec["paths"]["/threads/{thread_id}/runs"]["post"]["parameters"]
    pattern = next(p for p in thread if p["name"] == "thread_id")["schema"]["pattern"]
    assert pattern == "^[A-Za-z0-9_-]{1,128}$"


# ---- hypothesis: every route, with odd JSON, odd options and odd headers ----------------------
#
# schemathesis above sends what the schema describes; this sends what it does not: any JSON
# number (integers of a thousand digits, 2**1024, NaN, Infinity), any string (NUL, lone
# surrogates), deep nesting, bodies on GETs, raw bytes, random headers and credentials, on
# every route the pod serves, with each kind of reply source answering the option checks: the
# mock, the OpenAI source (the fake provider behind it), and plug-ins (one whose check trusts
# its input). The answer must never be a 5xx.
#
# Each request is well-formed but for one thing it gets wrong (its "focus": the credential,
# the thread id, a query parameter, a header, or one field of the body, model_options most
# often), and now and then everything at once: an odd value behind valid ones is what reaches
# the checks deep inside. CI runs a fixed seed and a small budget (FUZZ_EXAMPLES, under a
# minute for the four sources); THREADGATE_FUZZ_EXAMPLES=3000 (per source) hunts longer.

FUZZ_SEED = 20261126
# Examples per source in CI: most with the mock (the routes), fewer with the others (their
# option checks). The knob sets every source's.
FUZZ_EXAMPLES = {
    "mock": 500,
    "openai": 200,
    "tests.plugins:scripted": 150,
    "tests.plugins:picky": 200,
}
if os.environ.get("THREADGATE_FUZZ_EXAMPLES"):
    FUZZ_EXAMPLES = dict.fromkeys(FUZZ_EXAMPLES, int(os.environ["THREADGATE_FUZZ_EXAMPLES"]))

ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates included
# What broke answers before: NUL (PostgreSQL), lone surrogates (JSON's UTF-8), subject
# characters, long strings.
NASTY = st.sampled_from(
    [
        "\x00",
        "a\x00b",
        "\ud800",
        "a\udfffb",
        "\udc00x",
        "\udbff\udbff",
        ".",
        "*",
        "x" * 300,
        "é€😀",
        "",
    ]
)
TEXT = st.one_of(NASTY, st.text(ANY_CHAR, max_size=24))
NUMBERS = st.one_of(
    st.sampled_from([2**1024, 10**400, -(10**400), -1, 0, 1, 1e308, -0.0, 0.5, 100_001, 3.0]),
    st.integers(min_value=-(10**1000), max_value=10**1000),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


DEEP = st.integers(30, 40).map(nested)
ODD = st.one_of(NASTY, NUMBERS, TEXT, JSON, DEEP)
# The options each source takes (and a few it does not): odd values under names it knows are
# what reach its own checks.
OPTION_NAMES = {
    "mock": sorted(MOCK_OPTIONS),
    "openai": [*KNOWN_OPTIONS, "max_tokens"],
    "tests.plugins:scripted": ["delay_ms", "color"],
    "tests.plugins:picky": ["n", "of", "x1", "needed", "delay_ms"],
}


def options(names: list[str]) -> st.SearchStrategy[Any]:
    known = st.dictionaries(
        st.sampled_from(names),
        st.one_of(NUMBERS, ODD, st.sampled_from(["transient", "permanent", True, [], [1]])),
        min_size=1,
        max_size=2,
    )
    return st.one_of(known, known, st.dictionaries(st.sampled_from(names) | TEXT, ODD), ODD)


VALID_THREAD = st.from_regex(r"fz-[a-z0-9]{1,6}", fullmatch=True)
ODD_THREAD = st.one_of(NASTY, TEXT, st.sampled_from(["a.b", "%2E", "\u0430", "t" * 129]))
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
)
GOOD_MESSAGE = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}

# Each route: method, path, the body's fields (a good value, an odd one), or None: no body.
Fields = dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]
RUN_FIELDS: Fields = {
    "input": (st.just("hi"), ODD),
    "multitask_strategy": (st.sampled_from(["enqueue", "reject", "interrupt"]), ODD),
    "model_options": (st.just({}), st.nothing()),  # drawn with the source's names
    "timeout_s": (st.just(30), ODD),
    "extra": (st.nothing(), ODD),  # absent unless it is the odd one
}
CHAT_FIELDS: Fields = {
    "id": (VALID_THREAD, ODD_THREAD),
    "messages": (st.just([GOOD_MESSAGE]), JSON | st.lists(st.fixed_dictionaries({"role": TEXT}))),
    "message": (st.nothing(), JSON),
    "trigger": (st.just("submit-message"), ODD),
    "messageId": (st.nothing(), ODD),
    "model_options": (st.just({}), st.nothing()),
    "timeout_s": (st.nothing(), ODD),
}
ADOPT_FIELDS: Fields = {"run_ids": (st.just([]), st.lists(TEXT) | ODD)}
ROUTES: list[tuple[str, str, Fields | None]] = [
    ("POST", "/threads/{t}/runs", RUN_FIELDS),
    ("POST", "/ai-sdk/chat", CHAT_FIELDS),
    ("GET", "/threads/{t}/runs", None),
    ("GET", "/threads/{t}/runs/{r}", None),
    ("POST", "/threads/{t}/runs/{r}/cancel", None),
    ("GET", "/threads/{t}/messages", None),
    ("GET", "/threads/{t}/attach", None),
    ("GET", "/ai-sdk/chat/{t}/stream", None),
    ("GET", "/admin/stranded", None),
    ("POST", "/admin/stranded/adopt", ADOPT_FIELDS),
    ("GET", "/healthz", None),
    ("GET", "/readyz", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/", None),
    ("GET", "/favicon.ico", None),
    ("GET", "/static/app.js", None),
    ("DELETE", "/threads/{t}/runs", None),  # no such route: 405, never 5xx
]
QUERY = {
    "limit": st.sampled_from(["1", "2"]),
    "cursor": st.nothing(),
    "wait": st.just("false"),
    "timeout": st.just("1"),
    "last_event_id": st.nothing(),
    "run_id": st.nothing(),
    "format": st.nothing(),
    "force": st.nothing(),
    "access_token": st.nothing(),
    "before": st.nothing(),
}
STREAMS = ("/attach", "/stream", "/ai-sdk/chat")


def quoted(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def fields_of(draw: st.DrawFn, fields: Fields, odd: str | None, names: list[str]) -> dict[str, Any]:
    body = {}
    for name, (good, bad) in fields.items():
        if name == odd:
            body[name] = draw(options(names) if name == "model_options" else bad)
        elif not good.is_empty:
            body[name] = draw(good)
    return body


@st.composite
def requests(
    draw: st.DrawFn, tokens: dict[str, str], odd_tokens: list[str], names: list[str]
) -> tuple[str, str, dict[str, Any]]:
    """(method, URL path with its query, httpx keyword arguments) for one odd request."""
    # The routes that take options and accept runs half the time.
    method, template, fields = draw(
        st.sampled_from(ROUTES[:2]) | st.sampled_from(ROUTES[:2]) | st.sampled_from(ROUTES)
    )
    others = ["auth", "thread", "run", "query", "header", "content", "everything"]
    body = [f"body:{name}" for name in fields or {}]
    if "model_options" in (fields or {}):
        body += ["body:model_options"] * 2
    focus = draw(st.sampled_from(body) if body and draw(st.booleans()) else st.sampled_from(others))
    wild = focus == "everything"

    thread = draw(ODD_THREAD if focus == "thread" or wild else VALID_THREAD)
    run_id = draw(TEXT if focus == "run" or wild else st.uuids().map(str))
    path = template.replace("{t}", quoted(thread)).replace("{r}", quoted(run_id))
    query = {k: draw(v) for k, v in QUERY.items() if not v.is_empty and draw(st.booleans())}
    if focus == "query" or wild:
        odd = draw(st.sampled_from(list(QUERY)) | TEXT)
        query[odd] = draw(st.one_of(TEXT, NUMBERS.map(str), st.sampled_from(["true", "ai-sdk"])))
    if query:
        path += "?" + "&".join(f"{quoted(k)}={quoted(v)}" for k, v in query.items())

    auth = draw(st.sampled_from([f"Bearer {t}" for t in tokens.values()]))
    if focus == "auth" or wild:
        auth = draw(
            st.one_of(
                st.none(),
                HEADER_TEXT,
                HEADER_TEXT.map(lambda t: f"Bearer {t}"),
                st.sampled_from([f"Bearer {t}" for t in odd_tokens]),
            )
        )
    headers: dict[str, bytes] = {}
    if auth is not None:
        headers["authorization"] = auth.strip(" \t").encode(
            "latin-1"
        )  # httpx sends no outer blanks
    if focus == "header" or wild:
        name = draw(st.sampled_from(["idempotency-key", "last-event-id", "content-type", "x-fuzz"]))
        headers[name] = draw(HEADER_TEXT).strip(" \t").encode("latin-1")

    content: bytes | None = None
    if fields is not None:
        odd_field = focus.removeprefix("body:") if focus.startswith("body:") else None
        body = fields_of(draw, fields, None if wild else odd_field, names)
        if wild:
            body = draw(st.one_of(JSON, st.just(fields_of(draw, fields, odd_field, names))))
        content = json.dumps(body).encode()
    if focus == "content" or (wild and draw(st.booleans())):
        content = draw(
            st.one_of(
                st.binary(max_size=64),
                JSON.map(lambda v: json.dumps(v).encode()),
                st.integers(4000, 6000).map(lambda n: b'{"input": "x", "n": ' + b"9" * n + b"}"),
            )
        )
    if content is not None:
        headers.setdefault("content-type", b"application/json")
    return method, path, {"headers": headers, "content": content}


def fuzz(
    url: str, tokens: dict[str, str], odd_tokens: list[str], names: list[str], examples: int
) -> Counter[int]:
    """Send `examples` odd requests; every status seen. A 5xx fails (hypothesis shrinks it)."""
    seen: Counter[int] = Counter()
    with httpx.Client(base_url=url, timeout=15) as http:

        @settings(
            max_examples=examples,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate, Phase.shrink],
        )
        @seed(FUZZ_SEED)
        @given(requests(tokens, odd_tokens, names))
        def one(request: tuple[str, str, dict[str, Any]]) -> None:
            method, path, kwargs = request
            if any(s in path.split("?")[0] for s in STREAMS):
                with http.stream(method, path, **kwargs) as resp:
                    status = resp.status_code  # the stream itself is not read: its head says
            else:
                status = http.request(method, path, **kwargs).status_code
            seen[status] += 1
            assert status < 500, (method, path, kwargs, status)

        with warnings.catch_warnings():
            # The pod, serving on another thread meanwhile, uses `random`: hypothesis sees its
            # state move during a draw and warns, though its own generation does not use it.
            warnings.simplefilter("ignore", HypothesisDeprecationWarning)
            one()
    return seen


@pytest.mark.parametrize("source", list(FUZZ_EXAMPLES))
async def test_fuzz_every_route_never_answers_5xx(pod: Pod, source: str) -> None:
    # Odd credentials besides random ones: signed JWTs whose sub no principal can have.
    odd_tokens = [jwt_token(sub) for sub in ["a\x00", "\ud800", "\x7f"]]
    rt = pod.runtime
    before = rt.source
    async with contextlib.AsyncExitStack() as stack:
        changes: dict[str, Any] = {**AUTH_ON, "max_retries": 0}
        if source == "openai":
            _, url = await stack.enter_async_context(serve_fake())
            changes.update(
                model="openai",
                openai_base_url=url,
                openai_api_key="sk-fuzz",
                openai_client_options=",".join([*KNOWN_OPTIONS, "max_tokens"]),
            )
        elif source != "mock":
            changes["model"] = source
        with pod_settings(pod, **changes) as settings:
            rt.source = load_source(settings)
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                # In a thread: the pod serves on this loop meanwhile.
                seen = await asyncio.to_thread(
                    fuzz, pod.url, KEYS, odd_tokens, OPTION_NAMES[source], FUZZ_EXAMPLES[source]
                )
                took = loop.time() - started
                await cancel_fuzz_runs(pod)
            finally:
                rt.source = before
    print(f"\n{source}: {sum(seen.values())} requests in {took:.0f}s, statuses {dict(seen)}")
    assert not any(s >= 500 for s in seen)
    # The fuzz reached past the checks, not only into them.
    assert seen[200] + seen[202] + seen[204] > 0 and seen[400] > 0 and seen[401] > 0


def fuzz_options(url: str, token: str, names: list[str], examples: int) -> Counter[int]:
    """Each option name the source takes, with `examples` odd values of every kind, alone in
    an otherwise good request (on the native route and on the AI SDK's, in turn)."""
    seen: Counter[int] = Counter()
    with httpx.Client(base_url=url, timeout=15) as http:
        for name in names:

            @settings(
                max_examples=examples,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.generate, Phase.shrink],
            )
            @seed(FUZZ_SEED)
            @given(st.just(name), st.one_of(NUMBERS, ODD), st.booleans())
            def one(name: str, value: Any, chat: bool) -> None:
                options = {name: value}
                headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
                if chat:
                    message = {"id": "", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
                    body = {"id": "fz-opt", "messages": [message], "model_options": options}
                    with http.stream(
                        "POST", "/ai-sdk/chat", content=json.dumps(body), headers=headers
                    ) as resp:
                        status = resp.status_code
                else:
                    body = {"input": "hi", "model_options": options}
                    resp = http.post(
                        "/threads/fz-opt/runs", content=json.dumps(body), headers=headers
                    )
                    status = resp.status_code
                seen[status] += 1
                assert status < 500, (name, value, chat, status)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HypothesisDeprecationWarning)
                one()
    return seen


@pytest.mark.parametrize("source", list(FUZZ_EXAMPLES))
async def test_fuzz_each_option_of_each_source(pod: Pod, source: str) -> None:
    rt = pod.runtime
    before = rt.source
    examples = max(10, FUZZ_EXAMPLES[source] // 10)
    async with contextlib.AsyncExitStack() as stack:
        changes: dict[str, Any] = {
            **AUTH_ON,
            "max_retries": 0,
            "max_active_runs_per_principal": 10_000,
        }
        if source == "openai":
            _, url = await stack.enter_async_context(serve_fake())
            changes.update(
                model="openai",
                openai_base_url=url,
                openai_client_options=",".join([*KNOWN_OPTIONS, "max_tokens"]),
            )
        elif source != "mock":
            changes["model"] = source
        with pod_settings(pod, **changes) as settings:
            rt.source = load_source(settings)
            try:
                names = OPTION_NAMES[source]
                seen = await asyncio.to_thread(
                    fuzz_options, pod.url, KEYS["alice"], names, examples
                )
                await cancel_fuzz_runs(pod)
            finally:
                rt.source = before
    print(f"\n{source}: {sum(seen.values())} requests, statuses {dict(seen)}")
    assert not any(s >= 500 for s in seen) and seen[400] > 0 and seen[202] + seen[200] > 0
