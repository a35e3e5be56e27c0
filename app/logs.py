"""Structured logs: one JSON line per event in production, readable lines in dev.

Every record carries `pod`; run records carry `thread_id`, `run_id` and `attempt` (pass them
in `extra=`). Secrets never reach a record: settings hold them as SecretStr, and what others
send back (a provider that echoes our request headers) is `redact`ed; as a last line, every
line the handler writes has the pod's own secrets blanked out (`Redacting`). DBOS's records go
through the same handler, less its start-up noise (`DbosNoise`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
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


MASK = "***"
# Headers that carry a credential, in requests or in answers echoing them.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie", "set-cookie"}
)
# A credential in text: a bearer token, or the value after a credential header's name (as a
# provider echoing our headers writes it: JSON, a Python dict's repr, or a header line).
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s\"',;}\]]+")
_HEADER_VALUE = re.compile(
    r"(?i)([\"']?(?:proxy-)?(?:authorization|api[-_]key|x-api-key|cookie|set-cookie)[\"']?"
    r"\s*[:=]\s*[\"']?)([^\"'\n,}\]]+)"
)
MIN_SECRET_CHARS = 6  # shorter "secrets" would blank out ordinary words


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with `secrets`, bearer tokens and credential headers' values masked. Mask first,
    then cut: a cut made first could leave a secret's first characters."""
    for secret in secrets:
        if len(secret) >= MIN_SECRET_CHARS:
            text = text.replace(secret, MASK)
    text = _HEADER_VALUE.sub(lambda m: m[1] + MASK, text)
    return _BEARER.sub(lambda m: m[1] + m[2] + MASK, text)


def masked_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Headers as they may be logged: every credential header's value masked."""
    return {k: MASK if k.lower() in CREDENTIAL_HEADERS else v for k, v in headers}


class Redacting(logging.Formatter):
    """Writes what `inner` formats with the pod's secrets masked: whatever path a secret took
    into a record (a message, an extra, a traceback), it does not reach the log."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len)[::-1]

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record), self.secrets)


def setup_logging(
    pod: str, *, json_lines: bool, level: str = "INFO", secrets: Iterable[str] = ()
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Redacting(JsonFormatter() if json_lines else TextFormatter(), secrets))
    handler.addFilter(PodFilter(pod))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpcore's DEBUG trace writes a provider's answer headers as they came.
    for noisy in ("uvicorn.access", "nats", "httpx", "httpcore"):
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
