"""PostgreSQL failover under live runs: the primary is SIGKILLed, its synchronous standby is
promoted, the pods carry on by themselves.

Real processes: a primary and a synchronous streaming standby from the embedded binaries
(tests/multipod/ha.py), three pods whose THREADGATE_DATABASE_URL names both hosts with
`target_session_attrs=read-write` (libpq's multi-host form, turned into SQLAlchemy's for DBOS:
threadgate.store.db.dbos_url). Replies use `vary`, so any mix of attempts shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from threadgate.client import AsyncClient

from tests.conftest import Stack, unique
from tests.multipod.cluster import Attacher, Cluster, pod_env, unique_names, wait_run
from tests.multipod.conftest import logs_on_failure
from tests.multipod.ha import PgPair
from tests.multipod.test_nats_cluster import vary_attempts

pytestmark = pytest.mark.multipod


@pytest.fixture
def pg_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgPair]:
    # Under /tmp itself: PostgreSQL's unprivileged account must reach the data directories.
    pair = PgPair(tmp_path_factory.mktemp("pg"))
    pair.start()
    try:
        yield pair
    finally:
        pair.stop()


async def readyz_postgres(url: str) -> bool | None:
    """What a pod's /readyz says of PostgreSQL (None: the pod does not answer)."""
    async with httpx.AsyncClient(timeout=2) as http:
        try:
            checks: dict[str, Any] = (await http.get(f"{url}/readyz")).json().get("checks", {})
        except (httpx.TransportError, ValueError):
            return None
    return bool(checks.get("postgres"))


async def post_until_accepted(urls: list[str], thread: str, opts: dict[str, Any]) -> str:
    """A client that retries its POST (same Idempotency-Key, any pod) until it is accepted:
    a run is accepted once, whatever answer was lost on the way."""
    key = f"failover-{uuid.uuid4()}"
    body = {"input": "through a failover", "model_options": opts}
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(400):
            url = urls[i % len(urls)]
            with contextlib.suppress(httpx.TransportError):
                resp = await http.post(
                    f"{url}/threads/{thread}/runs", json=body, headers={"Idempotency-Key": key}
                )
                if resp.status_code in (200, 202):
                    return str(resp.json()["run_id"])
            await asyncio.sleep(0.05)
    raise AssertionError(f"{thread}: never accepted")


# One of the slowest multipod tests (about a minute, like test_nats_cluster; two beside a CPU
# hog): started first, and its own waits (30 s for the promotion, 120 s per run) fit its budget.
@pytest.mark.long
@pytest.mark.timeout(300)
async def test_primary_killed_mid_reply_standby_promoted(
    stack: Stack,
    pg_pair: PgPair,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> None:
    stream, prefix = unique_names()
    env = pod_env(
        database_url=pg_pair.create_database(f"ha_{uuid.uuid4().hex[:8]}"),
        nats_url=stack.nats.url,
        stream=stream,
        prefix=prefix,
        mock_delay_ms=25,
        coalesce_ms=50,  # the product's default (the suite pins it off): replies are checked whole
    )
    pods = Cluster(env, tmp_path_factory.mktemp("pods"), 3)
    logs_on_failure(request, pods)
    await pods.start()
    pids = [p.pid for p in pods.pods]
    urls = pods.urls
    rotate = [urls[i:] + urls[:i] for i in range(3)]
    opts = {"chunks": 120, "vary": True}
    try:
        # Runs streaming when the primary dies ...
        streaming = [unique("pg") for _ in range(4)]
        runs: dict[str, str] = {}
        for i, t in enumerate(streaming):
            runs[t] = await post_until_accepted(rotate[i % 3], t, opts)
        attachers = {
            t: Attacher(rotate[i % 3], t, reconnects=60).start() for i, t in enumerate(streaming)
        }
        await asyncio.gather(*(attachers[t].wait_chunk(10, 60) for t in streaming))
        # ... and runs being posted around the kill, some accepted just before it.
        arriving = [unique("pgnew") for _ in range(6)]
        posts = {
            t: asyncio.create_task(post_until_accepted(rotate[i % 3], t, opts))
            for i, t in enumerate(arriving)
        }
        await asyncio.wait(list(posts.values()), return_when=asyncio.FIRST_COMPLETED)
        t_kill = time.monotonic()
        pg_pair.primary.stop(kill=True)
        # An operator (or CloudNativePG) promotes the standby once the primary is gone.
        async with asyncio.timeout(30):
            while await readyz_postgres(urls[0]):  # noqa: ASYNC110 - another process's view
                await asyncio.sleep(0.05)
        pg_pair.standby.promote()
        t_promoted = time.monotonic()
        for t in arriving:
            runs[t] = await posts[t]
            attachers[t] = Attacher(rotate[1], t, reconnects=60).start()
        attempts: dict[str, int] = {}
        done_at: dict[str, float] = {}
        async with AsyncClient(urls) as client:
            for t, run_id in runs.items():
                final = await wait_run(client, t, run_id, timeout=120)
                done_at[t] = time.monotonic() - t_promoted
                assert final["status"] == "success", final
                attempts[t] = int(final["attempt"])
                listed = await client.runs(t)
                assert [r["run_id"] for r in listed] == [run_id], listed  # accepted once
                messages = await client.messages(t)
                assert [m["role"] for m in messages] == ["user", "assistant"], messages
                stored = messages[1]["content"]
                vary_attempts(stored)
                reply = await attachers[t].result(60)
                assert reply.status == "success" and reply.text == stored
                late = await client.reply(t)
                assert late.text == stored
        assert [p.pid for p in pods.pods] == pids and all(p.alive for p in pods.pods), (
            "a pod was restarted"
        )
        print(
            "\nprimary killed, standby promoted: attempts per run "
            f"(streaming) {sorted(attempts[t] for t in streaming)}, "
            f"(posted around the kill) {sorted(attempts[t] for t in arriving)}; "
            f"promoted {t_promoted - t_kill:.1f}s after the kill; runs seen finished "
            f"{', '.join(f'{x:.1f}' for x in sorted(done_at.values()))} s after the promotion"
        )
        # The docs' promise (README, Failure behaviour): accepted runs finish once, in the
        # attempt they began (streaming) or will begin (accepted around the kill).
        assert set(attempts.values()) == {1}, attempts
    finally:
        await pods.stop()
