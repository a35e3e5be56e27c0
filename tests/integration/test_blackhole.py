"""A query sent to a black-holed PostgreSQL ends within THREADGATE_PG_TCP_USER_TIMEOUT_S,
on the app's pool and on DBOS's engine alike (tests/integration/blackhole.py says how)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TCP_USER_TIMEOUT_S = 2.0
CAP_S = 12.0  # far below the kernel's ~15 minutes of retransmissions
MARGIN_S = 3.0  # a loaded machine's scheduling, on top of the bound


def in_private_network(tcp_user_timeout_s: float) -> dict[str, Any]:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip: a private network namespace to black-hole")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -n refused here: {probe.stderr.decode().strip()}")
    done = subprocess.run(
        [
            *("unshare", "-n", sys.executable, "-m", "tests.integration.blackhole"),
            *(str(tcp_user_timeout_s), str(CAP_S)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_stalled_query_ends_within_the_tcp_user_timeout() -> None:
    out = in_private_network(TCP_USER_TIMEOUT_S)
    print(f"\nblack-holed queries failed after: {out}")
    for key in ("pool_s", "dbos_engine_s"):
        took = out[key]
        assert took is not None, f"{key}: still stalled after {CAP_S}s"
        assert TCP_USER_TIMEOUT_S - 0.5 <= took <= TCP_USER_TIMEOUT_S + MARGIN_S, (key, took)
    assert out["tcp_options"]["tcp_user_timeout"] == 2000
    assert out["engine_connect_args"]["tcp_user_timeout"] == 2000
