"""Fixtures of the multipod suite: a fresh cluster of real pods per test, their logs on failure.

Each cluster gets its own database on the session's PostgreSQL and its own JetStream stream
and subject prefix on the session's nats-server, so no two tests share queues or subjects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import pytest

from tests.conftest import Stack
from tests.multipod.cluster import Cluster, pod_env, unique_names

StartCluster = Callable[..., Awaitable[Cluster]]
CLUSTERS = pytest.StashKey[list[Cluster]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cluster(size=3, per_pod=None, **knobs): how the `cluster` fixture starts its pods "
        "(knobs become THREADGATE_<KNOB> for every pod; per_pod maps an index to extra env)",
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[Any]:
    """A failed phase carries the tails of its clusters' pod logs, shown under the failure in
    pytest's summary (added here, before xdist sends the report to the controller)."""
    report = yield
    clusters = item.stash.get(CLUSTERS, [])
    if report.failed and clusters:
        report.sections.append(("pod logs (tails)", "\n".join(c.logs() for c in clusters)))
    return report


def logs_on_failure(request: pytest.FixtureRequest, cluster: Cluster) -> None:
    """A failure of the requesting test shows the tails of `cluster`'s pod logs."""
    request.node.stash.setdefault(CLUSTERS, []).append(cluster)


@pytest.fixture
async def start_cluster(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> AsyncIterator[StartCluster]:
    """Start a cluster (any number per test); all are killed at teardown, logs kept on failure."""
    clusters = request.node.stash.setdefault(CLUSTERS, [])  # their logs under a failure

    async def start(
        size: int = 3,
        per_pod: Mapping[int, Mapping[str, str]] | None = None,
        **knobs: str | float | int,
    ) -> Cluster:
        stream, prefix = unique_names()
        env = pod_env(
            database_url=stack.new_database("mp"),
            nats_url=stack.nats.url,
            stream=stream,
            prefix=prefix,
            **knobs,
        )
        cluster = Cluster(env, tmp_path_factory.mktemp("pods"), size, per_pod)
        clusters.append(cluster)
        await cluster.start()
        return cluster

    try:
        yield start
    finally:
        for cluster in clusters:
            await cluster.stop()


@pytest.fixture
async def cluster(start_cluster: StartCluster, request: pytest.FixtureRequest) -> Cluster:
    marker = request.node.get_closest_marker("cluster")
    kwargs = dict(marker.kwargs) if marker else {}
    return await start_cluster(**kwargs)
