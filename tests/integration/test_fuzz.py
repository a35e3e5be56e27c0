"""Schemathesis against the pod's own OpenAPI schema: no 5xx, and every answer as documented.

The `st` CLI runs as a subprocess (the pod serves on this test's event loop, so the fuzzer
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
import os
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Pod
from tests.integration.knobs import AUTH_ON, KEYS, pod_settings

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
