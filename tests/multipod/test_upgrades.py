"""Application versions: a rolling deploy strands nothing, adoption takes only what is stranded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import httpx
import psycopg
import pytest
from threadgate.models.mock import mock_reply

from tests.conftest import unique
from tests.multipod.cluster import Attacher, running_on, wait_run
from tests.multipod.conftest import StartCluster

pytestmark = pytest.mark.multipod


async def test_runs_queued_under_the_old_version_run_after_a_deploy(
    start_cluster: StartCluster,
) -> None:
    """A long run and two queued behind it on v1; SIGTERM (the drain lets the long run finish);
    the name comes back on v2. The queued runs used to stay pending for good: v2's queue
    worker claims only v2's runs. Nothing of theirs ran, so v2 takes them over."""
    cluster = await start_cluster(size=1, app_version="v1", drain_timeout_s=60)
    pod = cluster.pods[0]
    thread = unique()
    async with cluster.client() as client:
        long = await client.post(thread, "long", model_options={"chunks": 20, "delay_ms": 50})
        queued = [await client.post(thread, f"q{i}", model_options={"chunks": 3}) for i in (1, 2)]
        await running_on(client, cluster, thread, long["run_id"])
        assert await pod.term() == 0
        await pod.restart({"THREADGATE_APP_VERSION": "v2"})
        assert (await client.run(thread, long["run_id"]))["status"] == "success"
        for q in queued:
            final = await wait_run(client, thread, q["run_id"], timeout=60)
            assert final["status"] == "success" and final["attempt"] == 1
        async with httpx.AsyncClient(base_url=pod.url) as http:
            assert (await http.get("/admin/stranded")).json()["runs"] == []


async def test_runs_queued_under_a_version_whose_last_pod_left_move_to_a_live_pod(
    start_cluster: StartCluster,
) -> None:
    """Across pods, not at a start: a long run and two queued behind it on the v1 pod; a v2
    pod already runs. The v1 pod drains and leaves for good (a rolling deploy's last old pod):
    the live v2 pod moves the queued runs to its version (its checks, or the kick the leaving
    pod sends) and runs them; nothing restarts."""
    cluster = await start_cluster(
        size=2,
        app_version="v1",
        per_pod={1: {"THREADGATE_APP_VERSION": "v2"}},
        drain_timeout_s=60,
        adopt_check_s=0.5,
        auto_adopt="false",  # stranded runs' adoption would take them too: only the move here
    )
    old, new = cluster.pods
    thread = unique()
    async with cluster.client([old]) as on_old, cluster.client([new]) as on_new:
        long = await on_old.post(thread, "long", model_options={"chunks": 20, "delay_ms": 50})
        queued = [await on_old.post(thread, f"q{i}", model_options={"chunks": 3}) for i in (1, 2)]
        assert (await running_on(on_old, cluster, thread, long["run_id"])) is old
        assert await old.term() == 0  # and it never comes back
        assert (await on_new.run(thread, long["run_id"]))["status"] == "success"
        for q in queued:
            final = await wait_run(on_new, thread, q["run_id"], timeout=60)
            assert final["status"] == "success" and final["attempt"] == 1
            assert final["executor"] == new.name
        assert new.starts == 1  # moved by a live pod, not at a start


async def test_adopt_takes_only_the_stranded_runs(start_cluster: StartCluster) -> None:
    """A pod back on v2 with a run stranded under v1 and a live v2 run streaming: adopting used
    to recover every PENDING run under the name, live ones included (attempt 2, a reset)."""
    cluster = await start_cluster(size=1, app_version="v1", mock_delay_ms=20, auto_adopt="false")
    pod = cluster.pods[0]
    stranded_thread, live_thread = unique(), unique()
    async with cluster.client() as client:
        stranded = await client.post(stranded_thread, "old", model_options={"chunks": 30})
        await running_on(client, cluster, stranded_thread, stranded["run_id"])
        await pod.kill()
        await pod.restart({"THREADGATE_APP_VERSION": "v2"})
        live = await client.post(live_thread, "new", model_options={"chunks": 150})
        watcher = Attacher([pod.url], live_thread).start()
        await watcher.wait_chunk(5)
        async with httpx.AsyncClient(base_url=pod.url, timeout=30) as http:
            listing = (await http.get("/admin/stranded")).json()
            assert [r["run_id"] for r in listing["runs"]] == [stranded["run_id"]]
            adopted = (await http.post("/admin/stranded/adopt")).json()
        assert adopted == {"adopted": [stranded["run_id"]], "refused": []}
        old = await wait_run(client, stranded_thread, stranded["run_id"], timeout=60)
        assert old["status"] == "success" and old["attempt"] == 2
        reply = await watcher.result(60)
        new = await wait_run(client, live_thread, live["run_id"])
        assert new["status"] == "success" and new["attempt"] == 1
        assert reply.resets == 0 and reply.text == new["output"]


async def test_a_threads_waiting_runs_share_one_version_mid_rollout(
    start_cluster: StartCluster,
) -> None:
    """Mid-rollout (one pod on v1, one on v2), a run posted to the v2 pod behind a thread's v1
    run waits in v1: DBOS's claim takes a partition's first run *of the claimer's version*, so
    a v2 run beside a queued v1 run could start while the v1 run starts on the other pod."""
    cluster = await start_cluster(
        size=2,
        mock_delay_ms=20,
        per_pod={0: {"THREADGATE_APP_VERSION": "v1"}, 1: {"THREADGATE_APP_VERSION": "v2"}},
    )
    old, new = cluster.pods
    thread = unique()
    async with cluster.client([old]) as on_old, cluster.client([new]) as on_new:
        first = await on_old.post(thread, "first", model_options={"chunks": 40})
        second = await on_new.post(thread, "second", model_options={"chunks": 3})
        one = await wait_run(on_new, thread, first["run_id"], timeout=60)
        two = await wait_run(on_new, thread, second["run_id"], timeout=60)
    assert one["status"] == two["status"] == "success"
    assert two["executor"] == old.name  # queued under v1: only the v1 pod runs it
    assert one["finished_at"] <= two["started_at"]


async def test_a_run_stranded_by_a_version_change_is_adopted_by_itself(
    start_cluster: StartCluster,
) -> None:
    """A pod SIGKILLed mid-reply on v1 comes back on v2: DBOS's recovery takes only v2's runs.
    The run's steps are today's, so the adoption checks move it to v2 and it continues."""
    cluster = await start_cluster(size=1, app_version="v1", mock_delay_ms=20, adopt_check_s=0.5)
    pod = cluster.pods[0]
    thread = unique()
    async with cluster.client() as client:
        run = await client.post(thread, "x", model_options={"chunks": 60, "vary": True})
        watcher = Attacher([pod.url], thread, reconnects=50).start()
        await watcher.wait_chunk(5)
        await pod.kill()
        await pod.restart({"THREADGATE_APP_VERSION": "v2"})
        final = await wait_run(client, thread, run["run_id"], timeout=60)
        reply = await watcher.result(30)
    assert final["status"] == "success" and final["attempt"] == 2
    kept = final["attempts"][1]["resume_from"]
    assert final["output"] == mock_reply(60, {0: 1, kept: 2}) == reply.text
    assert reply.resets == 0 and "adopted 1 stranded runs into version v2" in pod.log_text()


async def adopt_cli(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """`threadgate adopt` as an operator runs it."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "threadgate.cli", "adopt", "--url", url, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_adopt_lists_with_dry_run_refuses_differing_steps_and_forces(
    start_cluster: StartCluster,
) -> None:
    """Three runs stranded by a version change (auto-adoption off). `threadgate adopt
    --dry-run` lists them and moves nothing; `POST /admin/stranded/adopt` moves exactly the
    runs asked for; `threadgate adopt` moves the compatible one left and refuses a run whose
    recorded steps differ from today's workflow (exit 4), which only `--force` moves."""
    cluster = await start_cluster(size=1, app_version="v1", mock_delay_ms=20, auto_adopt="false")
    pod = cluster.pods[0]
    threads = [unique() for _ in range(3)]
    async with cluster.client() as client:
        posted = [
            await client.post(t, "old", model_options={"chunks": 100, "vary": True})
            for t in threads
        ]
        a, b, c = (p["run_id"] for p in posted)
        watchers = [Attacher([pod.url], t, reconnects=50).start() for t in threads]
        for w in watchers:
            await w.wait_chunk(3)
        await pod.kill()
        await pod.restart({"THREADGATE_APP_VERSION": "v2"})
        # As if v1's workflow had had another first step: c's recorded steps are not today's.
        async with await psycopg.AsyncConnection.connect(
            cluster.env["THREADGATE_DATABASE_URL"], autocommit=True
        ) as db:
            await db.execute(
                """INSERT INTO dbos.operation_outputs (workflow_uuid, function_id,
                       function_name, application_name, retention_timestamp)
                   VALUES (%s, 1, 'draft_reply', 'threadgate', 0)""",
                (c,),
            )

        async with httpx.AsyncClient(base_url=pod.url, timeout=30) as http:

            async def stranded() -> dict[str, tuple[list[str], bool]]:
                runs = (await http.get("/admin/stranded")).json()["runs"]
                return {r["run_id"]: (r["steps"], r["compatible"]) for r in runs}

            before = await stranded()
            assert before == {a: ([], True), b: ([], True), c: (["draft_reply"], False)}

            dry = await adopt_cli(pod.url, "--dry-run")
            assert dry.returncode == 0, dry.stdout + dry.stderr
            lines = dry.stdout.splitlines()
            assert "pod threadgate-0 (version v2): 3 stranded runs" in lines[0]
            for run_id, (_, ok) in before.items():
                line = next(x for x in lines if run_id in x)
                assert "version v1" in line and line.endswith("ok" if ok else "STEPS DIFFER")
            assert "adopted" not in dry.stdout
            assert await stranded() == before  # a dry run moves nothing
            for t, run_id in zip(threads, (a, b, c), strict=True):
                assert (await client.run(t, run_id))["attempt"] == 1

            nobody = str(uuid.uuid4())  # a run id no run has
            asked = await http.post("/admin/stranded/adopt", json={"run_ids": [a, nobody]})
            assert asked.json() == {"adopted": [a], "refused": [nobody]}
            assert set(await stranded()) == {b, c}

            plain = await adopt_cli(pod.url)
            assert plain.returncode == 4, plain.stdout + plain.stderr  # something was refused
            assert "adopted 1, refused 1" in plain.stdout
            assert set(await stranded()) == {c}

            forced = await adopt_cli(pod.url, "--force")
            assert forced.returncode == 0, forced.stdout + forced.stderr
            assert "adopted 1, refused 0" in forced.stdout
            assert await stranded() == {}

        replies = [await w.result(60) for w in watchers]
        for t, run_id, reply in zip(threads[:2], (a, b), replies, strict=False):
            final = await wait_run(client, t, run_id, timeout=60)
            assert (final["status"], final["attempt"]) == ("success", 2)
            kept = final["attempts"][1]["resume_from"]
            assert final["output"] == reply.text == mock_reply(100, {0: 1, kept: 2})
            assert reply.resets == 0 and reply.duplicates == 0
        # Forced, the run's recorded step does not match today's: DBOS refuses to replay it
        # (DBOSUnexpectedStepError), the run ends `error` keeping what its clients saw (the
        # parts its first attempt streamed, stored as its reply), and its thread goes on.
        # That is the risk --force takes.
        forced = await wait_run(client, threads[2], c, timeout=60)
        error = {"code": "internal", "message": "DBOSUnexpectedStepError"}
        assert (forced["status"], forced["error"]) == ("error", error)
        assert (replies[2].status, replies[2].error) == ("error", error)
        assert forced["output"] == replies[2].text
        messages = await client.messages(threads[2])
        assert [m["role"] for m in messages] == ["user", "assistant"]
        nxt = await client.post(threads[2], "new", model_options={"chunks": 3})
        assert (await wait_run(client, threads[2], nxt["run_id"]))["status"] == "success"
