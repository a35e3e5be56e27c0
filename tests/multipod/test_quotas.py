"""Quotas per principal hold across pods: two `threadgate serve` pods accepting one
principal's runs at once let exactly the quota through, whichever pod each POST reaches."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import psycopg
import pytest

from tests.conftest import unique
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod

KEYS = {"alice": "alice-quota-key-3f9e", "bob": "bob-quota-key-81c2"}
RUNS_PER_DAY = 25
THREADS = 10


async def test_quotas_across_two_pods(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(
        size=2,
        auth="on",
        api_keys=",".join(f"{p}:{k}" for p, k in KEYS.items()),
        quota_runs_per_day=RUNS_PER_DAY,
        quota_threads=THREADS,
        max_active_runs_per_principal=1000,
        mock_chunks=0,
    )
    urls = cluster.urls

    async def post(http: httpx.AsyncClient, i: int, who: str, thread: str) -> httpx.Response:
        return await http.post(
            f"{urls[i % 2]}/threads/{thread}/runs",
            json={"input": f"run {i}"},
            headers={"Authorization": f"Bearer {KEYS[who]}"},
        )

    async with httpx.AsyncClient(timeout=60) as http:
        # alice: 60 runs at once on 6 threads (both pods, every thread on both): runs per day.
        threads = [unique() for _ in range(6)]
        answers = await asyncio.gather(*(post(http, i, "alice", threads[i % 6]) for i in range(60)))
        codes = Counter(
            a.json()["error"]["code"] if a.status_code == 429 else a.status_code for a in answers
        )
        assert codes == {202: RUNS_PER_DAY, "quota_runs_per_day": 60 - RUNS_PER_DAY}, codes
        # bob: 30 new threads at once: threads.
        answers = await asyncio.gather(*(post(http, i, "bob", unique()) for i in range(30)))
        codes = Counter(
            a.json()["error"]["code"] if a.status_code == 429 else a.status_code for a in answers
        )
        assert codes == {202: THREADS, "quota_threads": 30 - THREADS}, codes
        by_pod = Counter(str(a.url).split("/threads")[0] for a in answers if a.status_code == 202)
        print(f"\nbob's threads accepted by pod: {dict(by_pod)}")

    # What the database holds agrees with what was answered.
    async with await psycopg.AsyncConnection.connect(
        cluster.env["THREADGATE_DATABASE_URL"]
    ) as conn:
        cur = await conn.execute(
            """SELECT t.owner, count(r.run_id) FROM threadgate.threads t
               JOIN threadgate.runs r ON r.thread_id = t.thread_id
               GROUP BY t.owner ORDER BY t.owner"""
        )
        runs = await cur.fetchall()
        cur = await conn.execute("SELECT count(*) FROM threadgate.threads WHERE owner = 'bob'")
        bobs = await cur.fetchone()
    assert runs == [("alice", RUNS_PER_DAY), ("bob", THREADS)]
    assert bobs == (THREADS,)
