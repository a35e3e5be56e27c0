"""`threadgate_queue_depth` reads NaN when its sample fails, never a stale or made-up count."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from threadgate.metrics import Metrics

pytestmark = pytest.mark.unit


class BrokenPool:
    @contextlib.asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[Any]:
        raise OSError("connection refused")
        yield  # pragma: no cover


class BrokenDatabase:
    pool = BrokenPool()


def depth(metrics: Metrics) -> float:
    families = text_string_to_metric_families(metrics.render().decode())
    return next(s.value for f in families for s in f.samples if s.name == "threadgate_queue_depth")


async def test_queue_depth_is_nan_when_its_sample_fails() -> None:
    metrics = Metrics()
    metrics.queue_depth.set(7)  # a count from an earlier scrape: must not be shown again
    await metrics.sample_queue_depth(BrokenDatabase(), "thread_runs")  # type: ignore[arg-type]
    assert math.isnan(depth(metrics))
