"""Readiness checks are bounded and never pile up; every PostgreSQL connection gets TCP
timeouts (the real black hole: tests/integration/test_blackhole.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from threadgate.main import dbos_config
from threadgate.readiness import DependencyCheck, check_all
from threadgate.settings import load_settings
from threadgate.store.db import tcp_options

pytestmark = pytest.mark.unit


async def test_a_hung_check_answers_false_in_time_and_runs_once() -> None:
    started = 0
    release = asyncio.Event()

    async def hung() -> bool:
        nonlocal started
        started += 1
        await release.wait()
        return True

    async def fine() -> bool:
        return True

    checks = {"db": DependencyCheck("db", hung), "nats": DependencyCheck("nats", fine)}
    t0 = time.monotonic()
    assert await check_all(checks, 0.2) == {"db": False, "nats": True}
    assert await check_all(checks, 0.2) == {"db": False, "nats": True}
    assert time.monotonic() - t0 < 2.0  # two bounded probes, not a hung one
    assert started == 1  # the second probe waited on the first check instead of another
    release.set()
    assert await check_all(checks, 0.2) == {"db": True, "nats": True}


async def test_a_failing_check_is_false() -> None:
    async def broken() -> bool:
        raise OSError("refused")

    assert await DependencyCheck("x", broken)(1.0) is False


def test_tcp_options_reach_the_pool_and_dbos() -> None:
    settings = load_settings(pod_name="p", pg_tcp_user_timeout_s=7.5, pg_keepalives_idle_s=4)
    opts = tcp_options(settings)
    assert opts == {
        "keepalives": 1,
        "keepalives_idle": 4,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "tcp_user_timeout": 7500,
    }
    engine = dbos_config(settings)["db_engine_kwargs"]
    assert engine is not None
    assert engine["pool_pre_ping"] is False
    assert engine["connect_args"] == {
        "application_name": "dbos_transact",
        "connect_timeout": 10,
        **opts,
    }
    off = tcp_options(load_settings(pod_name="p", pg_tcp_user_timeout_s=0))
    assert "tcp_user_timeout" not in off


async def test_probes_that_overlap_each_get_their_own_checks_answer() -> None:
    """A probe whose check finished while another probe began the next check answers with its
    own check's result (it read the newer, unfinished one: InvalidStateError, a 500)."""

    async def quick() -> bool:
        await asyncio.sleep(0)
        return True

    check = DependencyCheck("quick", quick)
    for stagger in range(6):
        for _ in range(50):
            first = asyncio.create_task(check(1.0))
            for _ in range(stagger):
                await asyncio.sleep(0)  # event-loop turns between the two probes, no clock
            second = asyncio.create_task(check(1.0))
            assert await asyncio.gather(first, second) == [True, True]
