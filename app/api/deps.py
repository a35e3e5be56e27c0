"""Annotated dependencies of the routes: the pod's runtime and validated path ids."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from app.errors import Unavailable
from app.ids import check_thread_id
from app.main import Runtime
from app.streams.tail import TailHub
from app.workflows.runner import Runner


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(runtime)]


def thread_id_param(
    thread_id: Annotated[str, Path(description="Thread id, ^[A-Za-z0-9_-]{1,128}$")],
) -> str:
    return check_thread_id(thread_id)


ThreadId = Annotated[str, Depends(thread_id_param)]


def runner(rt: RuntimeDep) -> Runner:
    if rt.runner is None or rt.draining:
        raise Unavailable("this pod is not accepting runs (starting or draining)")
    return rt.runner


def hub(rt: RuntimeDep) -> TailHub:
    if rt.hub is None:
        raise Unavailable("this pod is not ready")
    return rt.hub


RunnerDep = Annotated[Runner, Depends(runner)]
HubDep = Annotated[TailHub, Depends(hub)]
