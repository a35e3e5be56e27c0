"""Quotas per principal: runs per day, threads and stored bytes, charged as runs are accepted.

The counters are rows (`threadgate.usage`, `threadgate.usage_daily`) kept current as rows are
written: `charge` adds an accepted run (and its thread, when new); a trigger keeps each
principal's stored bytes, the size of its messages (their text and parts, uncompressed), as
they are inserted, stored again or deleted (retention). Checking a quota reads two rows, whatever the
principal has stored. `threadgate.charge` (schema.sql) checks and counts in one transaction,
its rows locked throughout: pods accepting at once never let more than the quota through.

Stored bytes are checked at accept (what is stored, plus the new input): a reply is counted
once it is stored, so the runs a principal has in flight may take it past the quota (by their
replies), never further.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, cast

from psycopg import AsyncConnection

from ..errors import QuotaExceeded
from ..settings import Settings

# Threads and stored bytes only come back when an operator raises the quota: ask again later.
RETRY_LATER_S = 3600


Quota = Literal["runs_per_day", "threads", "stored_bytes"]


class Charged(Protocol):
    """What a run costs at accept: its input and options (RunRequest has them)."""

    @property
    def input(self) -> str: ...
    @property
    def model_options(self) -> dict[str, Any] | None: ...


async def charge(
    conn: AsyncConnection[Any],
    settings: Settings,
    owner: str | None,
    thread_id: str,
    request: Charged,
) -> None:
    """Count one accepted run against `owner`'s quotas, on `conn` (the accept's connection,
    under the thread's lock), or raise QuotaExceeded (429) naming the quota, counting nothing.
    The anonymous caller of a pod with auth off (`owner` None) has no quota."""
    if owner is None:
        return
    size = len(request.input.encode()) + len(json.dumps(request.model_options or {}).encode())
    cur = await conn.execute(
        "SELECT threadgate.charge(%s, %s, %s, %s, %s, %s) AS exceeded",
        (
            owner,
            thread_id,
            size,
            settings.quota("runs_per_day"),
            settings.quota("threads"),
            settings.quota("stored_bytes"),
        ),
    )
    row = await cur.fetchone()
    exceeded = row["exceeded"] if row else None
    if exceeded:
        raise _exceeded(cast(Quota, exceeded), settings)


def _exceeded(quota: Quota, settings: Settings) -> QuotaExceeded:
    if quota == "runs_per_day":
        now = datetime.now(UTC)
        midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
        return QuotaExceeded(
            quota,
            f"this principal has had its {settings.quota(quota)} runs today (UTC days)",
            retry_after=max(1, int((midnight - now).total_seconds()) + 1),
        )
    if quota == "threads":
        message = f"this principal has its {settings.quota(quota)} threads"
    else:
        message = f"this principal has stored its {settings.quota(quota)} bytes"
    return QuotaExceeded(quota, message, retry_after=RETRY_LATER_S)
