"""`threadgate serve` with nothing to talk to: one line naming the setting and the address
tried (no 30 s pool wait, no traceback); `serve --help` lists every setting and its default."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from threadgate.devstack import free_port
from threadgate.settings import Settings

pytestmark = pytest.mark.unit

SERVE = [sys.executable, "-m", "threadgate.cli", "serve"]


def serve(**env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_")}
    t0 = time.monotonic()
    # The timeout guards against the old 30 s wait: a hang fails here, not a figure.
    proc = subprocess.run(
        SERVE, env={**clean, **env}, capture_output=True, text=True, timeout=25, cwd="/"
    )
    return proc, time.monotonic() - t0


@pytest.fixture
def answers_as_nats() -> Iterator[int]:
    """A port that greets like nats-server (its INFO line), and nothing more."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def greet() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b'INFO {"server_id":"fake"}\r\n')

    thread = threading.Thread(target=greet, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    thread.join()
    listener.close()


def test_nats_that_does_not_answer_is_named_in_one_line() -> None:
    port = free_port()
    proc, took = serve(THREADGATE_NATS_URL=f"nats://127.0.0.1:{port}")
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == (
        f"threadgate: cannot reach NATS at 127.0.0.1:{port} (THREADGATE_NATS_URL): "
        "connection refused\n"
    )
    print(f"\nserve gave up on NATS in {took:.1f}s")


def test_a_database_that_does_not_answer_is_named_in_one_line(answers_as_nats: int) -> None:
    port = free_port()
    proc, took = serve(THREADGATE_NATS_URL=f"nats://127.0.0.1:{answers_as_nats}")
    # THREADGATE_DATABASE_URL is not set: its default is tried, and said to be the default.
    assert proc.returncode == 3, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(
        "threadgate: cannot reach PostgreSQL at 127.0.0.1:5432 (THREADGATE_DATABASE_URL is not"
        " set: this is its default): "
    ), line
    url = f"postgresql://u@127.0.0.1:{port}/db"
    proc, took = serve(
        THREADGATE_NATS_URL=f"nats://127.0.0.1:{answers_as_nats}", THREADGATE_DATABASE_URL=url
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith(
        f"threadgate: cannot reach PostgreSQL at 127.0.0.1:{port} (THREADGATE_DATABASE_URL): "
    )
    assert "Connection refused" in proc.stderr and len(proc.stderr.splitlines()) == 1
    print(f"\nserve gave up on PostgreSQL in {took:.1f}s")


def test_serve_help_lists_every_setting_with_its_default() -> None:
    proc = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    listed = {}
    for line in proc.stdout.split("environment settings (default):\n", 1)[1].splitlines():
        name, _, default = line.strip().partition(" ")
        listed[name] = default.strip()
    for field, info in Settings.model_fields.items():
        env = "POD_NAME" if field == "pod_name" else f"THREADGATE_{field.upper()}"
        if field == "control_subject_name":
            env = "THREADGATE_CONTROL_SUBJECT"
        # A setting with a standard name of its own (OTEL_*) is listed under that name.
        names = {env, *getattr(info.validation_alias, "choices", ())}
        assert names & listed.keys(), env
    assert listed["THREADGATE_PORT"] == "8000"
    assert listed["THREADGATE_ENV"] == "dev  (dev|production)"
    assert listed["THREADGATE_DATABASE_URL"] == "postgresql://postgres@127.0.0.1:5432/threadgate"
    assert listed["THREADGATE_QUEUE_POLLING_S"] == "2"
    assert listed["THREADGATE_API_KEYS"] == "(empty)"
