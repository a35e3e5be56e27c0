"""Log lines: JSON in production, DBOS's records included, with the run fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from dbos._logger import init_logger
from threadgate.logs import JsonFormatter, PodFilter, adopt_dbos_logger

pytestmark = pytest.mark.unit


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger writing JSON lines to a buffer; everything restored afterwards."""
    root = logging.getLogger()
    dbos = logging.getLogger("dbos")
    saved = (root.handlers[:], root.level, dbos.handlers[:], dbos.propagate)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(PodFilter("pod-a"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        dbos.handlers[:], dbos.propagate = saved[2], saved[3]


def test_dbos_records_stay_ours_when_dbos_initializes_its_logger_again(
    captured: io.StringIO,
) -> None:
    adopt_dbos_logger()
    init_logger()  # what DBOS() does first: adds its console handler to a logger without one
    logging.getLogger("dbos").info("Initializing DBOS (v3.4.0)")
    lines = captured.getvalue().splitlines()
    assert [json.loads(x)["msg"] for x in lines] == ["Initializing DBOS (v3.4.0)"]
    assert json.loads(lines[0])["pod"] == "pod-a"
    assert not [h for h in logging.getLogger("dbos").handlers if h.name]


def test_run_fields_are_json_fields(captured: io.StringIO) -> None:
    extra = {"thread_id": "t1", "run_id": "r1", "attempt": 2}
    logging.getLogger("threadgate.workflows.thread_run").info("run attempt replayed", extra=extra)
    line = json.loads(captured.getvalue())
    assert {k: line[k] for k in ("msg", "level", "pod", *extra)} == {
        "msg": "run attempt replayed",
        "level": "info",
        "pod": "pod-a",
        **extra,
    }
