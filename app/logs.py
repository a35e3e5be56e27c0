"""Structured logs: one JSON line per event in production, readable lines in dev.

Every record carries `pod`; run records carry `thread_id`, `run_id` and `attempt` (pass them
in `extra=`). Secrets never reach a record: settings hold them as SecretStr.
"""

from __future__ import annotations

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
