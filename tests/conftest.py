"""Shared fixtures: one real PostgreSQL and one real nats-server per test session.

Both are started from the installed packages on free ports and are ready when they answer
(PostgreSQL a query, nats-server its "Server is ready" line). Each suite gets its own database
and stream so suites never share DBOS queues or subjects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import nats
import psycopg
import pytest
from dbos import DBOS
from nats.js.errors import NotFoundError
from threadgate.devstack import NatsServer, Postgres, make_state_dir, release_port
from threadgate.store.db import dbos_url

TEMPLATE = "threadgate_template"


@dataclass
class Stack:
    root: Path
    pg: Postgres
    nats: NatsServer

    def new_database(self, prefix: str, *, empty: bool = False) -> str:
        """A fresh database on the shared server; returns its URL. A copy of TEMPLATE (DBOS's
        system tables and threadgate's, migrated: 1-2 s saved per pod start-up), or `empty`."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        template = "" if empty else f' TEMPLATE "{TEMPLATE}"'
        with psycopg.connect(self.pg.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{template}'.encode())
        return self.pg.url(name)


def make_template(pg: Postgres) -> None:
    """TEMPLATE: a database with DBOS's migrations and threadgate's schema applied, as a pod's
    start-up leaves it (the pods find both up to date and skip them)."""
    with psycopg.connect(pg.url("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"'.encode())
    DBOS.migrate(dbos_url(pg.url(TEMPLATE)))
    schema = resources.files("threadgate.store").joinpath("schema.sql").read_text()
    with psycopg.connect(pg.url(TEMPLATE), autocommit=True) as conn:
        conn.execute(schema.encode())


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Under /tmp itself: PostgreSQL's unprivileged account must reach the data directory.
    root = make_state_dir(Path(tempfile.mkdtemp(prefix="threadgate-test-", dir="/tmp")))
    pg = Postgres(root / "pg", fast=True)
    # A CI machine's disk, not this one's: every stream reserves its max_bytes up front, so the
    # streams alive at once must fit a few GiB (each test's are dropped at its end, and
    # tests/multipod/cluster.py:pod_env keeps them small).
    nats = NatsServer(root / "nats", max_file_store=4 * 1024**3)
    pg.start()
    nats.start()
    try:
        make_template(pg)
        yield Stack(root, pg, nats)
    finally:
        nats.stop()
        pg.stop()
        release_port(nats.port)
        release_port(pg.port)
        if not os.environ.get("THREADGATE_KEEP_TEST_STATE"):
            shutil.rmtree(root, ignore_errors=True)


def _streams(url: str, drop: set[str] | None = None) -> set[str]:
    """The server's stream names; with `drop`, those streams deleted first. In a thread of its
    own: the tests' event loop is not running between a test and its fixtures."""

    async def go() -> set[str]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            for name in drop or ():
                with contextlib.suppress(NotFoundError):
                    await js.delete_stream(name)
            return {info.config.name for info in await js.streams_info() if info.config.name}
        finally:
            await nc.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result(timeout=30)


@pytest.fixture(autouse=True)
def _drop_new_streams(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test's streams on the shared nats-server go with it (after its pods: this fixture is
    set up first, so torn down last). JetStream reserves every stream's max_bytes up front."""
    if "stack" not in request.fixturenames:
        yield
        return
    url = request.getfixturevalue("stack").nats.url
    before = _streams(url)
    yield
    new = _streams(url) - before
    if new:
        _streams(url, new)


def unavailable(why: str) -> NoReturn:
    """Something a test needs is not on this machine: skip, saying why; under CI, fail."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and this test cannot run: {why}", pytrace=False)
    pytest.skip(why)


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---- order: the longest first ------------------------------------------------------------

SUITES = ("multipod", "integration", "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `long` first (those with the largest `timeout` before the others), then
    the multipod, integration and unit suites (each in file order): the parallel workers take
    tests in this order, so the long ones overlap each other and the short ones fill the end,
    instead of one long test starting last. Every worker sorts alike (xdist requires it)."""

    def rank(item: pytest.Item) -> tuple[bool, float, int]:
        names = {m.name for m in item.iter_markers()}
        timeout = item.get_closest_marker("timeout")
        budget = float(timeout.args[0]) if timeout and timeout.args else 0.0
        suite = next((i for i, s in enumerate(SUITES) if s in names), len(SUITES))
        return "long" not in names, -budget, suite

    items.sort(key=rank)


# ---- under CI nothing skips ------------------------------------------------------------------

# (test id, reason) of every skipped test; with xdist, the controller gets the workers' reports.
SKIPPED: list[tuple[str, str]] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> Generator[None, None, None]:
    sendable(report)
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        SKIPPED.append((report.nodeid, reason))
    return (yield)


def sendable(report: pytest.TestReport) -> None:
    """A failure whose message holds a lone surrogate (a test of replies that carry them) is
    reported with it escaped: xdist sends reports as UTF-8, and one it cannot encode crashes
    the worker and hides the failure behind an INTERNALERROR."""

    def escaped(text: str) -> str:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    if report.longrepr is not None and not isinstance(report.longrepr, tuple):
        text = str(report.longrepr)
        if escaped(text) != text:
            report.longrepr = escaped(text)
    report.sections = [(title, escaped(body)) for title, body in report.sections]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skipped test fails the run: a missing browser, driver, node or package must
    not leave a green run that tested less than it says."""
    controller = not hasattr(session.config, "workerinput")
    if os.environ.get("CI") and SKIPPED and controller and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if os.environ.get("CI") and SKIPPED and not hasattr(config, "workerinput"):
        terminalreporter.section("skipped under CI, which fails the run", red=True, bold=True)
        for nodeid, reason in SKIPPED:
            terminalreporter.line(f"{nodeid}: {reason}")
