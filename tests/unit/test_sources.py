"""Loading reply sources by THREADGATE_MODEL: what fails start-up, and how it says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from threadgate.errors import ConfigError, InvalidRequest
from threadgate.models.mock import MockSource
from threadgate.registry import load_source
from threadgate.settings import load_settings
from threadgate.sources import (
    ReplySource,
    check_options,
    continues,
    number_option,
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


# ---- numbers and option checks (docs/security.md, "Model options") ----------------------------

HUGE = 10**400


@pytest.mark.parametrize(
    ("value", "integer", "ok"),
    [
        (5, True, True),
        (0, True, True),
        (10, True, True),
        (11, True, False),
        (-1, True, False),
        (HUGE, True, False),
        (-HUGE, False, False),
        (2**1024, False, False),  # past float's range: compared exactly, no OverflowError
        (5.0, True, False),  # a float where an integer is expected
        (5.5, False, True),
        (float("nan"), False, False),
        (float("inf"), False, False),
        (True, True, False),  # JSON true is not a number
        ("5", False, False),
        ([5], False, False),
        ({"n": 5}, False, False),
    ],
)
def test_number_option_takes_any_json_value_safely(value: object, integer: bool, ok: bool) -> None:
    options = {"n": value}
    if ok:
        assert number_option(options, "n", low=0, high=10, integer=integer) == value
    else:
        with pytest.raises(ValueError, match="n must be"):
            number_option(options, "n", low=0, high=10, integer=integer)
    assert number_option({}, "n", low=0, high=10, default=3) == 3
    assert number_option({"n": None}, "n", low=0, high=10) is None


class Raising:
    """A plug-in whose option check raises what its options say."""

    def __init__(self, method: str = "check_options") -> None:
        setattr(self, method, self._check)

    async def stream(self, prompt: object) -> AsyncIterator[str]:
        yield "x"

    def _check(self, options: dict[str, object]) -> None:
        raise {
            "value": ValueError("limit must be small"),
            "key": KeyError("secret-key-name"),
            "type": TypeError("secret internals"),
            "overflow": OverflowError("int too large to convert to float"),
            "exit": SystemExit(3),
            "invalid": InvalidRequest("refused \ud800 here"),
        }[str(options["raise"])]


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        ("value", "model_options: limit must be small"),
        ("key", "model_options refused (KeyError)"),
        ("type", "model_options refused (TypeError)"),
        ("overflow", "model_options refused (OverflowError)"),
        ("exit", "model_options refused (SystemExit)"),
        ("invalid", "refused \\ud800 here"),
    ],
)
@pytest.mark.parametrize("method", ["check_options", "validate_options"])
def test_whatever_an_option_check_raises_is_a_400(raised: str, said: str, method: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_options(Raising(method), {"raise": raised})  # type: ignore[arg-type]
    assert caught.value.status == 400
    body = caught.value.body()
    assert body["error"]["message"] == said
    json.dumps(body, ensure_ascii=False).encode()  # the answer can be written


@pytest.mark.parametrize(
    "options",
    [
        {"delay_ms": HUGE},
        {"delay_ms": 2**1024},
        {"delay_ms": -1},
        {"delay_ms": float("nan")},
        {"chunks": HUGE},
        {"chunks": -5},
        {"chunks": 5.0},
        {"fail_at": HUGE},
        {"fail_attempts": 2**1024},
        {"data_every": -1},
        {"data_every": 1.5},
        {"vary": 1},
        {"refuse_continue": "yes"},
    ],
)
def test_the_mock_refuses_numbers_out_of_range(options: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_options(load("mock"), options)
    (name,) = options
    assert raised.value.message.startswith(f"model_options: {name} must be")  # its range


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": HUGE},
        {"temperature": 2**1024},
        {"temperature": -HUGE},
        {"top_p": HUGE},
        {"top_p": float("inf")},
        {"max_tokens": HUGE},
        {"max_tokens": 1.0},
        {"max_tokens": -1},
        {"presence_penalty": 3},
    ],
)
def test_the_openai_source_refuses_numbers_out_of_range(options: dict[str, object]) -> None:
    source = load_source(
        load_settings(
            model="openai",
            openai_client_options="temperature,top_p,max_tokens,presence_penalty",
        )
    )
    with pytest.raises(InvalidRequest) as raised:
        check_options(source, options)
    (name,) = options
    assert raised.value.message.startswith(f"model_options: {name} must be")  # its range
    check_options(source, {"temperature": 2, "top_p": 0.5, "max_tokens": 4096})


@pytest.mark.parametrize(
    "code",
    [
        "def make(settings):\n    raise SystemExit(0)\n",
        "import sys\nsys.exit(0)\n",  # at import
    ],
)
def test_a_plugin_that_exits_fails_the_start(module: tuple[Path, str], code: str) -> None:
    path, name = module
    path.write_text(code)
    with pytest.raises(ConfigError) as raised:
        load(f"{name}:make")
    assert "SystemExit(0)" in raised.value.message and "\n" not in raised.value.message


def test_serve_exits_non_zero_when_a_plugin_factory_exits(tmp_path: Path) -> None:
    (tmp_path / "agent.py").write_text("def make(settings):\n    raise SystemExit(0)\n")
    proc = serve("agent:make", tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(
        "threadgate: THREADGATE_MODEL=agent:make: the factory raised SystemExit(0)"
    )
