"""Structured logs: one JSON line per event in production, readable lines in dev.

Every record carries `pod`; run records carry `thread_id`, `run_id` and `attempt` (pass them
in `extra=`). Secrets never reach a record: settings hold them as SecretStr. DBOS's records go
through the same handler, less its start-up noise (`DbosNoise`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from typing import Any

FIELDS = ("pod", "thread_id", "run_id", "attempt", "executor", "status", "error")
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class PodFilter(logging.Filter):
    def __init__(self, pod: str) -> None:
        super().__init__()
        self.pod = pod

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "pod", None):
            record.pod = self.pod
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = (
            f"{time.strftime('%H:%M:%S', time.localtime(record.created))}"
            f".{int(record.msecs):03d} {record.levelname:<7} "
            f"[{getattr(record, 'pod', '-')}] {record.getMessage()}"
        )
        extras = " ".join(
            f"{k}={record.__dict__[k]}" for k in FIELDS[1:] if record.__dict__.get(k) is not None
        )
        text = f"{base} {extras}" if extras else base
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(pod: str, *, json_lines: bool, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(PodFilter(pod))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "nats", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    adopt_dbos_logger()


class DbosNoise(logging.Filter):
    """DBOS's start-up chatter at DEBUG: one line per schema migration (~125 on a new
    database, summed up in one INFO line), the Conductor sign-up hint (dbos 3.4.0 prints it
    at every launch without a conductor_key; nothing connects anywhere: docs/security.md) and
    the ids of every batch of workflows retention deletes."""

    MIGRATION = "Applying DBOS system database schema migration "
    # DBOS names every workflow it deletes; retention (app/retention.py) logs how many.
    QUIET = (
        MIGRATION,
        "Migration 10 skipped",
        "To view and manage workflows, connect to DBOS",
        "Deleting workflow(s): ",
    )

    def __init__(self) -> None:
        super().__init__()
        self.applied: list[int] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.QUIET):
            if message.startswith(self.MIGRATION):
                with contextlib.suppress(ValueError):
                    self.applied.append(int(message[len(self.MIGRATION) :]))
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        if self.applied:
            # The migrations are over when DBOS says anything else.
            first, last, count = self.applied[0], self.applied[-1], len(self.applied)
            self.applied = []
            logging.getLogger(record.name).info(
                "DBOS system database schema: applied %d migrations (%d-%d)", count, first, last
            )
        return True


def adopt_dbos_logger() -> None:
    """DBOS installs its own console handler: send its records through ours instead.

    DBOS adds that handler only to a logger with no handlers, so a NullHandler stays in its
    place: otherwise `DBOS()` re-adds it and its first line ("Initializing DBOS") is printed
    in DBOS's format, not ours (a non-JSON line in a JSON log).
    """
    dbos_logger = logging.getLogger("dbos")
    kept = [h for h in dbos_logger.handlers if "otlp" in type(h).__name__.lower()]
    dbos_logger.handlers[:] = kept or [logging.NullHandler()]
    dbos_logger.propagate = True
    if not any(isinstance(f, DbosNoise) for f in dbos_logger.filters):
        dbos_logger.addFilter(DbosNoise())
