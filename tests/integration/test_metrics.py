"""/metrics moves with the work: runs, attempts, chunks, latency, attachers, queue depth."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from nats.js.errors import NotFoundError
from prometheus_client.parser import text_string_to_metric_families
from threadgate.metrics import Metrics
from threadgate.streams.buffer import JetStreamBuffer, connect_nats
from threadgate.streams.events import chunk

from tests.conftest import Stack, unique
from tests.integration.conftest import Pod
from tests.multipod.cluster import wait_run

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(pod: Pod) -> Samples:
    resp = await pod.http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def quiet(pod: Pod, timeout: float = 60.0) -> Samples:
    """A scrape once no run executes or waits on the pod: the session's pod may still be
    finishing runs that earlier tests posted and left, and the counters are the pod's."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    calm = 0
    while True:
        samples = await scrape(pod)
        busy = value(samples, "threadgate_runs_in_flight") + value(
            samples, "threadgate_queue_depth"
        )
        calm = calm + 1 if busy == 0 else 0
        if calm >= 3:
            return samples
        assert loop.time() < deadline, "the pod never went quiet"
        await asyncio.sleep(0.1)  # a gauge has no event to wait on: scrape again


async def test_a_run_moves_the_counters(pod: Pod) -> None:
    before = await quiet(pod)
    thread = unique("metrics")
    accepted = await pod.client.post(thread, "count me", model_options={"chunks": 7})
    reply = await pod.client.reply(thread)
    assert reply.status == "success"
    await wait_run(pod.client, thread, accepted["run_id"])
    after = await scrape(pod)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("threadgate_runs_accepted_total") == 1
    assert delta("threadgate_runs_finished_total", status="success") == 1
    assert delta("threadgate_run_attempts_total", kind="first") == 1
    assert delta("threadgate_run_attempts_total", kind="replay") == 0
    assert delta("threadgate_runs_recovered_total") == 0
    assert delta("threadgate_chunks_published_total") == 7
    assert delta("threadgate_time_to_first_chunk_seconds_count") == 1
    assert delta("threadgate_time_to_first_chunk_seconds_sum") > 0
    assert delta("threadgate_publish_retries_total") == 0
    assert value(after, "threadgate_launch_recovered_runs_total") == 0
    # Every family is there from the first scrape, so dashboards never see a gap.
    for name in (
        "threadgate_active_attachers",
        "threadgate_thread_tails",
        "threadgate_runs_in_flight",
        "threadgate_queue_depth",
        "threadgate_stranded_runs",
        "threadgate_runs_adopted_total",
    ):
        assert (name, ()) in after, name


async def test_a_transient_failure_counts_as_a_retry_not_a_recovery(pod: Pod) -> None:
    before = await quiet(pod)
    thread = unique("metrics")
    options = {"chunks": 3, "fail": "transient", "fail_attempts": 1}
    accepted = await pod.client.post(thread, "flaky", model_options=options)
    run = await wait_run(pod.client, thread, accepted["run_id"])
    assert (run["status"], run["attempt"]) == ("success", 2)
    after = await scrape(pod)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("threadgate_run_attempts_total", kind="first") == 1
    assert delta("threadgate_run_attempts_total", kind="retry") == 1
    assert delta("threadgate_run_attempts_total", kind="replay") == 0
    assert delta("threadgate_runs_recovered_total") == 0
    assert delta("threadgate_runs_finished_total", status="success") == 1


GAUGES = (
    "threadgate_active_attachers",
    "threadgate_thread_tails",
    "threadgate_runs_in_flight",
    "threadgate_queue_depth",
)


async def steady_gauges(pod: Pod, timeout: float = 30.0) -> dict[str, float]:
    """The gauges once they have held still for longer than a tail lingers: the session's pod
    may still be finishing what earlier tests left (a run ending, a tail closing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    hold = pod.settings.tail_linger_s + 0.5
    last: dict[str, float] = {}
    since = loop.time()
    while True:
        samples = await scrape(pod)
        now = {name: value(samples, name) for name in GAUGES}
        if now != last:
            last, since = now, loop.time()
        elif loop.time() - since >= hold:
            return now
        assert loop.time() < deadline, f"the gauges never settle: {now}"
        await asyncio.sleep(0.1)  # a gauge has no event to wait on: scrape again


async def test_gauges_while_runs_stream_and_wait(pod: Pod) -> None:
    """A run streaming to an attached client, a second one queued behind it on its thread:
    each gauge is exactly one above what the pod showed before, and back afterwards."""
    baseline = await steady_gauges(pod)
    thread = unique("metrics")
    first = await pod.client.post(thread, "one", model_options={"chunks": 40, "delay_ms": 25})
    first_event = asyncio.Event()

    async def attach() -> None:
        async for _ in pod.client.events(thread):  # follows `one`: the latest run right now
            first_event.set()

    attacher = asyncio.create_task(attach())
    await asyncio.wait_for(first_event.wait(), 10)
    second = await pod.client.post(thread, "two", model_options={"chunks": 2})
    during = await scrape(pod)
    for name in GAUGES:
        # One client on one tail, one run executing, one (`two`) waiting for its partition.
        assert value(during, name) == baseline[name] + 1, (name, baseline[name])

    await asyncio.wait_for(attacher, 30)
    await wait_run(pod.client, thread, first["run_id"])
    await wait_run(pod.client, thread, second["run_id"])
    # The run row says success a moment before the workflow itself returns: poll briefly.
    for name in ("threadgate_runs_in_flight", "threadgate_active_attachers"):
        await settles(pod, name, at_most=baseline[name])
    await settles(pod, "threadgate_queue_depth", at_most=baseline["threadgate_queue_depth"])


async def settles(pod: Pod, name: str, at_most: float, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (now := value(await scrape(pod), name)) > at_most:
        assert loop.time() < deadline, f"{name} stays at {now}, above {at_most}"
        await asyncio.sleep(0.05)  # a gauge has no event to wait on: scrape again


async def test_republished_messages_are_counted(stack: Stack, pod: Pod) -> None:
    """An ack that never comes: the publisher sends the message again and says how many."""
    tag = unique("s")[2:]
    settings = pod.settings.model_copy(
        update={
            "stream_name": f"RETRY_{tag}",
            "subject_prefix": f"retry{tag}",
            "publish_timeout_s": 0.2,
        }
    )
    metrics = Metrics()
    nc = await connect_nats(settings, "retry-test")
    try:
        buffer = JetStreamBuffer(settings, nc, on_republish=metrics.republished)
        await buffer.ensure_stream()
        pub = buffer.publisher("t-retry", "00000000-0000-4000-8000-000000000000", 1)
        real = pub._acked
        calls = 0

        def drop_first_ack(n: int, result: Any) -> None:
            nonlocal calls
            calls += 1
            if calls > 1:  # the first message is stored, but its ack is never seen
                real(n, result)

        pub._acked = drop_first_ack  # type: ignore[method-assign]
        for i in range(3):
            await pub.publish(chunk("r", 1, i, f"c{i}"), i)
        await pub.flush()
        retries = value(parse(metrics.render().decode()), "threadgate_publish_retries_total")
        assert retries == 3  # the lost one and the two queued behind it
        info = await buffer.js.stream_info(settings.stream_name)
        assert info.state.messages == 3  # the duplicate window dropped the copies
    finally:
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(settings.stream_name)
        await nc.close()
