"""Shared fixtures: one real PostgreSQL and one real nats-server per test session.

Both are started from the installed packages on free ports and are ready when they answer
(PostgreSQL a query, nats-server its "Server is ready" line). Each suite gets its own database
and stream so suites never share DBOS queues or subjects.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from threadgate.devstack import NatsServer, Postgres, make_state_dir


@dataclass
class Stack:
    root: Path
    pg: Postgres
    nats: NatsServer

    def new_database(self, prefix: str) -> str:
        """A fresh, empty database on the shared server; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.pg.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.pg.url(name)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Under /tmp itself: PostgreSQL's unprivileged account must reach the data directory.
    root = make_state_dir(Path(tempfile.mkdtemp(prefix="threadgate-test-", dir="/tmp")))
    pg = Postgres(root / "pg", fast=True)
    # A CI machine's disk, not this one's: every stream reserves its max_bytes up front, so the
    # suite's streams must fit a few GiB (tests/multipod/cluster.py:pod_env keeps them small).
    nats = NatsServer(root / "nats", max_file_store=4 * 1024**3)
    pg.start()
    nats.start()
    try:
        yield Stack(root, pg, nats)
    finally:
        nats.stop()
        pg.stop()
        if not os.environ.get("THREADGATE_KEEP_TEST_STATE"):
            shutil.rmtree(root, ignore_errors=True)


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
