"""Operator routes: runs stranded under this pod's name by another application version."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from ..errors import Unavailable
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
    executor: str
    app_version: str
    steps: list[str]
    compatible: bool


class StrandedList(BaseModel):
    pod: str
    app_version: str
    runs: list[StrandedOut]


class AdoptResult(BaseModel):
    adopted: list[str]
    refused: list[str]


@router.get("/stranded", response_model=StrandedList, responses=error_responses(503))
async def stranded(rt: RuntimeDep) -> StrandedList:
    """PENDING runs under this pod's name with another application version."""
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
) -> AdoptResult:
    """Move this pod's stranded runs to its version and recover them (steps must match)."""
    if rt.adoption is None or rt.draining:
        raise Unavailable("this pod is not ready")
    adopted, refused = await rt.adoption.adopt_stranded(force=force)
    return AdoptResult(adopted=adopted, refused=refused)
