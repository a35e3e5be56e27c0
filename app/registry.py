"""Resolving THREADGATE_MODEL to a reply source: the built-in names and plug-in import paths.

Kept apart from `sources.py` (the plug-in authors' API), so that the public API does not depend
on the built-in implementations, which import it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from typing import Any

from .errors import ConfigError
from .models.mock import MockSource
from .models.openai import OpenAISource
from .settings import Settings
from .sources import OPTION_CHECKS, ReplySource


def load_source(settings: Settings) -> ReplySource:
    """The source THREADGATE_MODEL names. One that cannot be loaded fails the pod's start."""
    if settings.model == "mock":
        return MockSource(settings)
    if settings.model == "openai":
        return OpenAISource(settings)
    return _plugin(settings)


def _plugin(settings: Settings) -> ReplySource:
    path = settings.model
    module_name, sep, attr = path.partition(":")
    where = f"THREADGATE_MODEL={path}"
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: use mock, openai or package.module:factory")
    _current_directory_importable()
    try:
        module = importlib.import_module(module_name)
    # ImportError, SyntaxError, whatever the module's own code raised; SystemExit too: a
    # module or factory that calls sys.exit() must fail the start, not end it with status 0.
    except (Exception, SystemExit) as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name and module_name.startswith(exc.name):
            hint = " (is it on PYTHONPATH, installed, or in the current directory?)"
        raise ConfigError(f"{where}: cannot import {module_name}: {_said(exc)}{hint}") from exc
    factory: Any = module
    for name in attr.split("."):
        if not hasattr(factory, name):
            raise ConfigError(f"{where}: {module_name} has no attribute {attr}")
        factory = getattr(factory, name)
    if not callable(factory):
        raise ConfigError(
            f"{where}: {attr} is not callable ({type(factory).__name__}); name a factory that"
            " takes the settings and returns the source"
        )
    try:
        source: ReplySource = factory(settings)
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"{where}: the factory raised {_said(exc)}") from exc
    _check_shape(where, source)
    return source


def _check_shape(where: str, source: Any) -> None:
    """Mistakes that would otherwise fail every run: caught at start instead."""
    kind = type(source).__name__
    stream = getattr(source, "stream", None)
    if not callable(stream):
        raise ConfigError(
            f"{where}: the factory returned {kind}, which has no stream(prompt) method"
        )
    if inspect.isgeneratorfunction(stream):
        raise ConfigError(
            f"{where}: {kind}.stream is a plain generator; make it `async def stream(self,"
            " prompt)` yielding str and Data"
        )
    if inspect.iscoroutinefunction(stream):
        raise ConfigError(
            f"{where}: {kind}.stream is a coroutine function without `yield`; it must be an"
            " async generator (yielding str and Data)"
        )
    for name in OPTION_CHECKS:
        check = getattr(source, name, None)
        if check is not None and (not callable(check) or inspect.iscoroutinefunction(check)):
            raise ConfigError(f"{where}: {kind}.{name} must be a plain method")


def _current_directory_importable() -> None:
    """As uvicorn does for its app: a plug-in module in the current directory loads whether
    the pod runs as `python -m threadgate.cli` (which puts the directory first on sys.path)
    or as the `threadgate` console script (which does not). Appended: it never shadows an
    installed package."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def _said(exc: BaseException) -> str:
    """An exception in one line: its class, its message's first line, where it was raised."""
    if isinstance(exc, SystemExit):
        # Its "message" is the exit status: say what happened instead.
        return f"SystemExit({exc.code!r}){_where(exc)}"
    said = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    message = said.strip().splitlines()[0][:300] if said and said.strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{text} ({exc.filename}:{exc.lineno})"
    return f"{text}{_where(exc)}"


def _where(exc: BaseException) -> str:
    """` (file:line)` of the innermost frame of the plug-in's own code that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename and f.filename != __file__]
    return f" ({own[-1].filename}:{own[-1].lineno})" if own else ""
