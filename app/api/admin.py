"""Operator routes: runs stranded by application versions no live pod runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field, field_validator

from ..errors import Unavailable
from ..ids import is_run_id
from .deps import RuntimeDep, admin
from .schemas import error_responses

# Admin principals only when auth is on (THREADGATE_ADMIN_PRINCIPALS); open with auth off.
router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(admin)],
    responses=error_responses(400, 401, 403),
)


class StrandedOut(BaseModel):
    run_id: str
    executor: str = Field(description="The pod name that ran or queued it")
    app_version: str
    status: str = Field(description="queued (never ran a step) or pending (ran, then stopped)")
    steps: list[str]
    compatible: bool


class StrandedList(BaseModel):
    pod: str
    app_version: str
    runs: list[StrandedOut]


class AdoptRequest(BaseModel):
    run_ids: list[str] | None = Field(
        default=None,
        max_length=10_000,
        description="Exactly these runs (default: every stranded run)",
    )

    @field_validator("run_ids")
    @classmethod
    def _run_ids(cls, value: list[str] | None) -> list[str] | None:
        # Refused before any query: a NUL or a lone surrogate cannot even reach PostgreSQL.
        if value is not None and not all(is_run_id(r) for r in value):
            raise ValueError("run_ids must be run ids (UUIDs, as /admin/stranded lists them)")
        return value


class AdoptResult(BaseModel):
    adopted: list[str]
    refused: list[str]


@router.get("/stranded", response_model=StrandedList, responses=error_responses(503))
async def stranded(rt: RuntimeDep) -> StrandedList:
    """Runs of the whole cluster that no live pod will run: their version has no live pod, or
    their pod name came back on another version. Oldest first."""
    if rt.adoption is None:
        raise Unavailable("this pod is not ready")
    runs = await rt.adoption.stranded()
    return StrandedList(
        pod=rt.settings.pod_name,
        app_version=rt.settings.app_version,
        runs=[
            StrandedOut(
                run_id=r.run_id,
                executor=r.executor,
                app_version=r.app_version,
                status=r.status,
                steps=r.steps,
                compatible=r.compatible,
            )
            for r in runs
        ],
    )


@router.post("/stranded/adopt", response_model=AdoptResult, responses=error_responses(503))
async def adopt_stranded(
    rt: RuntimeDep,
    force: Annotated[bool, Query(description="Adopt even runs whose steps differ")] = False,
    body: AdoptRequest | None = None,
) -> AdoptResult:
    """Move stranded runs to this pod's version and recover them (their steps must match).

    Only the stranded runs move (all, or the `run_ids` given): never a live run."""
    if rt.adoption is None or rt.draining:
        raise Unavailable("this pod is not ready")
    ids = body.run_ids if body is not None else None
    adopted, refused = await rt.adoption.adopt_stranded(ids, force=force)
    return AdoptResult(adopted=adopted, refused=refused)
