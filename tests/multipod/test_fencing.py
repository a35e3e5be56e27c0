"""Executor fencing: one live process per POD_NAME, or DBOS would run its workflows twice."""

from __future__ import annotations

import time

import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import Attacher, Cluster, at, running_on, wait_run

pytestmark = pytest.mark.multipod

CLAIM_TIMEOUT_S = 3  # THREADGATE_CLAIM_TIMEOUT_S of the cluster fixture's pods
START_MARGIN_S = 10  # interpreter start and imports on a busy 2-core machine
CHUNKS = 30


@pytest.mark.cluster(size=2)
async def test_a_second_process_under_a_live_name_exits_without_executing(
    cluster: Cluster,
) -> None:
    thread = unique()
    async with cluster.client() as client:
        run_id = (
            await client.post(thread, "long", model_options={"chunks": CHUNKS, "delay_ms": 40})
        )["run_id"]
        holder = await running_on(client, cluster, thread, run_id)
        other = cluster.others(holder.name)[0]
        watcher = Attacher([other.url], thread).start()
        await watcher.wait_chunk(2)
        # Frozen mid-run, still alive: its run is PENDING under its name and its claim is held.
        # A process that got past the fence would recover that run at DBOS launch.
        holder.pause()

        rogue = cluster.rogue(holder.name)
        rogue.spawn()
        code = await rogue.wait_exit(CLAIM_TIMEOUT_S + START_MARGIN_S)
        assert code != 0
        records = rogue.log_records()
        waits = [r for r in records if "is held by" in r["msg"]]
        failed = [r for r in records if "startup failed" in r["msg"]]
        assert waits and failed
        waited = (at(failed[0]["ts"]) - at(waits[0]["ts"])).total_seconds()
        assert CLAIM_TIMEOUT_S - 0.3 <= waited <= CLAIM_TIMEOUT_S + 2  # the whole claim timeout
        log = rogue.log_text()
        assert f"{holder.name!r} is held by another live process" in log
        assert f"threadgate {holder.name} pid={holder.pid} " in log  # names the holder
        for sign_of_execution in ("DBOS launched", "Recovering", "pod started", "run attempt"):
            assert sign_of_execution not in log
        async with cluster.client([other]) as on_other:
            run = await on_other.run(thread, run_id)
        assert (run["status"], run["attempt"], run["executor"]) == ("running", 1, holder.name)

        await holder.kill()
        t0 = time.monotonic()
        await holder.restart()
        took = time.monotonic() - t0
        restart_log = holder.log_text(start=2)
        assert "executor claim acquired" in restart_log
        assert "is held by" not in restart_log  # the dead holder's lock went with it: no wait
        assert took < CLAIM_TIMEOUT_S + START_MARGIN_S

        run = await wait_run(client, thread, run_id)
        # Attempt 1 by the holder, 2 by its restart: the rogue never ran the step.
        assert (run["status"], run["attempt"]) == ("success", 2)
        assert (await watcher.result()).text == mock_reply(CHUNKS)
        messages = [m for m in await client.messages(thread) if m["role"] == "assistant"]
        assert [m["content"] for m in messages] == [mock_reply(CHUNKS)]
