"""Identifiers: thread ids that are safe inside a NATS subject, run ids, message ids."""

from __future__ import annotations

import re
import uuid

from .errors import InvalidThreadId, RunNotFound

THREAD_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_THREAD_ID = re.compile(THREAD_ID_PATTERN)
# A run id is a UUID we minted; anything else cannot name a run.
_RUN_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def check_thread_id(thread_id: str) -> str:
    """Refuse anything that could change the subject: `.`, `*`, `>`, spaces, unicode, NUL."""
    # fullmatch, and ASCII-only classes: `$` alone would accept a trailing newline.
    if not _THREAD_ID.fullmatch(thread_id):
        raise InvalidThreadId(
            "thread id must match ^[A-Za-z0-9_-]{1,128}$", thread_id=thread_id[:140]
        )
    return thread_id


def is_run_id(run_id: str) -> bool:
    return bool(_RUN_ID.fullmatch(run_id))


def check_run_id(run_id: str) -> str:
    if not is_run_id(run_id):
        raise RunNotFound()
    return run_id


def new_run_id() -> str:
    return str(uuid.uuid4())


def message_id(run_id: str, attempt: int, part: str | int) -> str:
    """JetStream dedup id. Carries the attempt: a purge does not clear the duplicate window."""
    return f"{run_id}:{attempt}:{part}"
