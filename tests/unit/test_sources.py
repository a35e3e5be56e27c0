"""Loading reply sources by THREADGATE_MODEL: what fails start-up, and how it says so."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from threadgate.errors import ConfigError, InvalidRequest
from threadgate.models.mock import MockSource
from threadgate.settings import load_settings
from threadgate.sources import (
    ReplySource,
    check_options,
    continues,
    load_source,
    reads_history,
)

from tests.plugins import Scripted

pytestmark = pytest.mark.unit


def load(model: str) -> ReplySource:
    return load_source(load_settings(model=model))


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """An importable module file of a fresh name (imports are cached by name)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"plugin_{uuid.uuid4().hex[:8]}"
    return tmp_path / f"{name}.py", name


def test_builtin_sources_and_plugins_load() -> None:
    assert isinstance(load("mock"), MockSource)
    source = load("tests.plugins:scripted")
    assert isinstance(source, Scripted)
    # Attributes a source lacks take their documented defaults.
    assert reads_history(source) is False and continues(source) is False


@pytest.mark.parametrize(
    ("model", "said"),
    [
        ("nosuch", "use mock, openai or package.module:factory"),
        ("nosuch.module:", "use mock, openai or package.module:factory"),
        (
            "nosuch.module:make",
            "cannot import nosuch.module: ModuleNotFoundError: No module named 'nosuch' (is it"
            " on PYTHONPATH, installed, or in the current directory?)",
        ),
        ("tests.plugins:missing", "tests.plugins has no attribute missing"),
        ("tests.plugins:SECRET", "SECRET is not callable (str)"),
        ("tests.plugins:no_stream", "the factory returned object, which has no stream(prompt)"),
        (
            "tests.plugins:failing_factory",
            "the factory raised RuntimeError: the plug-in has no credentials (",
        ),
    ],
)
def test_a_plugin_that_cannot_load_names_its_path(model: str, said: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(model)
    message = raised.value.message
    assert message.startswith(f"THREADGATE_MODEL={model}: ")
    assert said in message and "\n" not in message


@pytest.mark.parametrize(
    ("code", "said"),
    [
        ("raise ImportError('needs the foo package')", "ImportError: needs the foo package ("),
        ("def broken(:\n", "SyntaxError: invalid syntax ("),
        (
            "class S:\n    def stream(self, prompt):\n        yield 'x'\n"
            "def make(settings):\n    return S()\n",
            "S.stream is a plain generator",
        ),
        (
            "class S:\n    async def stream(self, prompt):\n        return 'x'\n"
            "def make(settings):\n    return S()\n",
            "S.stream is a coroutine function without `yield`",
        ),
        (
            "class S:\n    async def stream(self, prompt):\n        yield 'x'\n"
            "    async def check_options(self, options):\n        pass\n"
            "def make(settings):\n    return S()\n",
            "S.check_options must be a plain method",
        ),
    ],
)
def test_mistakes_in_a_plugin_module_fail_at_load(
    module: tuple[Path, str], code: str, said: str
) -> None:
    path, name = module
    path.write_text(code)
    with pytest.raises(ConfigError) as raised:
        load(f"{name}:make")
    assert said in raised.value.message and "\n" not in raised.value.message
    if "(" in said:
        assert f"{path}:" in raised.value.message  # where it was raised


def test_dotted_factories_and_classes_load(module: tuple[Path, str]) -> None:
    path, name = module
    path.write_text(
        "class Agent:\n    def __init__(self, settings):\n        self.port = settings.port\n"
        "    async def stream(self, prompt):\n        yield 'x'\n"
        "    @classmethod\n    def make(cls, settings):\n        return cls(settings)\n"
    )
    assert type(load(f"{name}:Agent")).__name__ == "Agent"
    assert type(load(f"{name}:Agent.make")).__name__ == "Agent"


def test_a_source_checks_its_own_options() -> None:
    source = load("tests.plugins:scripted")
    check_options(source, {"delay_ms": 5})
    with pytest.raises(InvalidRequest) as raised:
        check_options(source, {"color": "red"})
    assert raised.value.message == "model_options: the scripted source has no colors"
    assert raised.value.status == 400


# ---- the pod's start, as an operator sees it --------------------------------------------------


def serve(model: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`threadgate serve` (the console script) in `cwd`; it fails before it connects."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_")}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(Path(sys.executable).parent / "threadgate"), "serve"],
        env={**env, "THREADGATE_MODEL": model},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("model", "said"),
    [
        ("nosuch.module:make", "cannot import nosuch.module: ModuleNotFoundError"),
        ("agent:nothing", "agent has no attribute nothing"),
        ("agent:no_stream", "the factory returned int, which has no stream(prompt) method"),
    ],
)
def test_serve_refuses_a_plugin_that_cannot_load_in_one_line(
    tmp_path: Path, model: str, said: str
) -> None:
    # A module in the current directory is found by the console script too (as by uvicorn).
    (tmp_path / "agent.py").write_text("def no_stream(settings):\n    return 42\n")
    proc = serve(model, tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"threadgate: THREADGATE_MODEL={model}: ") and said in line
