"""Seeded resume property with real pods (contract v3): random reply length, a kill of the
executor or not, a source that continues or regenerates, clients that read fast or slowly,
hang up at a random event and come back with their last id on a random pod (one whose tail
dropped the reply, one that was just restarted, or one that never served the thread), before
or after `done`, while the thread's next run starts or not. Every client ends with exactly
the stored reply, and the stored `vary` reply is what its attempts' record says it is.

`RESUME_POD_CASES=200 RESUME_POD_SEED=7 pytest tests/multipod/test_resume_property.py -s`
runs more (CI runs 16 of a seed printed at the start).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import httpx
import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import Cluster, wait_run
from tests.multipod.test_resume import Contract, read, stored

pytestmark = pytest.mark.multipod

CASES = int(os.environ.get("RESUME_POD_CASES", "16"))
SEED = int(os.environ.get("RESUME_POD_SEED", str(int(time.time()) % 100_000)))


def written_by(run: dict[str, Any]) -> dict[int, int]:
    """Which attempt wrote which parts of a `vary` reply, from the run's record: each attempt
    that kept k parts wrote from k on ({first index: attempt})."""
    starts: dict[int, int] = {}
    for a in run["attempts"]:
        kept = a.get("kept")
        if kept is None:
            continue  # it died before deciding: it wrote nothing
        starts = {i: w for i, w in starts.items() if i < kept}
        starts[kept] = a["attempt"]
    return starts


async def client(rng: random.Random, cluster: Cluster, thread: str, c: Contract) -> Contract:
    """Reads to `done`, hanging up now and then, back on a random pod each time."""
    async with asyncio.timeout(120):
        while c.status is None:
            pod = rng.choice(cluster.pods)
            stop = rng.choice([None, rng.randint(1, 5), rng.randint(5, 80)])
            try:
                code = await read(pod.url, thread, c, stop_after=stop)
            except (httpx.TransportError, httpx.RemoteProtocolError):
                code = 0  # that pod died under it, or is starting again
            if code not in (0, 200, 503):
                raise AssertionError(f"attach answered {code}")
            if code != 200 or rng.random() < 0.3:
                await asyncio.sleep(rng.choice([0.01, 0.1, 0.4]))  # a slow client, a backoff
    # Back with the id of `done`, on any pod that answers (one may be starting again).
    async with httpx.AsyncClient(timeout=10) as http:
        for pod in rng.sample(cluster.pods, len(cluster.pods)):
            try:
                resp = await http.get(
                    f"{pod.url}/threads/{thread}/attach",
                    headers={"Last-Event-ID": c.last_id or ""},
                )
            except httpx.TransportError:
                continue
            assert resp.status_code == 204, resp.status_code
            break
    return c


async def one_case(rng: random.Random, cluster: Cluster) -> str:
    thread = unique("p")
    chunks = rng.randint(3, 300)
    opts: dict[str, Any] = {"chunks": chunks, "delay_ms": rng.choice([2, 5, 10]), "vary": True}
    if rng.random() < 0.4:
        opts["refuse_continue"] = True
    kill = rng.random() < 0.5
    next_run = rng.random() < 0.3
    async with cluster.client() as api:
        run_id = (await api.post(thread, "x", model_options=opts))["run_id"]
        clients = [Contract() for _ in range(rng.randint(1, 3))]
        readers = [
            asyncio.create_task(client(random.Random(rng.random()), cluster, thread, c))
            for c in clients
        ]
        if kill:
            # A short run may end before a poll sees it running: then there is nothing to kill.
            seen = await wait_run(api, thread, run_id, lambda r: r["status"] != "pending", 60)
            kill = seen["status"] == "running"
        if kill:
            victim = cluster.pod(seen["executor"])
            await asyncio.sleep(rng.random() * chunks * opts["delay_ms"] / 1000)
            if victim.alive:
                await victim.kill()  # the supervisor starts it again, as a StatefulSet would
        if next_run:
            # Posted once every client follows the first run (an attach without an id
            # follows the thread's latest run).
            async with asyncio.timeout(60):
                while not all(c.events for c in clients):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # paces looking at the clients' events
            await api.post(thread, "next", model_options={"chunks": rng.randint(1, 200)})
        run = await wait_run(api, thread, run_id, timeout=120)
        got = await asyncio.gather(*readers)
        assert run["status"] == "success", run
        want_text = mock_reply(chunks, written_by(run))
        assert run["output"] == want_text, (run["attempts"], run["output"][:200])
        want = await stored(api, thread, run_id)
        for c in got:
            assert "".join(c.parts) == want_text
            assert [c.text] == want
    return f"{chunks} chunks, kill={kill}, refuse={bool(opts.get('refuse_continue'))}, next={next_run}, attempts={run['attempt']}"


@pytest.mark.timeout(1800)
@pytest.mark.cluster(size=3, tail_max_bytes=60_000, tail_linger_s=0.3, keepalive_s=0.5)
async def test_clients_that_hang_up_and_resume_on_random_pods_end_with_the_stored_reply(
    cluster: Cluster,
) -> None:
    print(f"\nresume property: seed {SEED}, {CASES} cases (RESUME_POD_SEED to replay)")
    rng = random.Random(SEED)
    async with cluster.supervised(backoff_s=0.1):
        for case in range(CASES):
            # A case's readers may hold the first run while the next one streams: one thread
            # per case, cases one after the other.
            what = await one_case(rng, cluster)
            print(f"  case {case}: {what}")
