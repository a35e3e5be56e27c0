"""The installed package is `threadgate`, not `app`: it installs and loads a plug-in beside a
user's own `app` package, as in every FastAPI project.

The wheel is built as `pip install threadgate` builds it (pyproject.toml and app/, with build
isolation: pip fetches setuptools from its configured index or cache) and installed into a
fresh venv. Only threadgate itself is installed there: the venv reaches its dependencies
through a .pth line naming this interpreter's site-packages, which takes a second where a full
install of dbos, psycopg, PostgreSQL and nats-server binaries takes minutes. The venv's own
site-packages comes first on sys.path, so `threadgate` is the wheel's (the test checks), and
a .pth line does not run the editable install's import hook kept in the directory it names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

USER_AGENT = """
from threadgate.sources import Data


class Agent:
    async def stream(self, prompt):
        yield Data("seen", {"by": __name__})
        yield "hello from the user's own app"


def make(settings):
    return Agent()
"""

CHECK = """
import asyncio, importlib, json, pkgutil, sys
import threadgate, threadgate.sources
from threadgate.settings import load_settings
from threadgate.registry import load_source
from threadgate.sources import Prompt
# Every module of the package imports (no leftover `app.` import anywhere).
for m in pkgutil.walk_packages(threadgate.__path__, "threadgate."):
    importlib.import_module(m.name)
import app, app.agent
source = load_source(load_settings(model="app.agent:make"))
async def parts():
    prompt = Prompt(messages=[{"role": "user", "content": "hi"}])
    return [p if isinstance(p, str) else [p.name, p.payload] async for p in source.stream(prompt)]
print(json.dumps({
    "threadgate": threadgate.__file__,
    "app": app.__file__,
    "app_name": app.NAME,
    "source": type(source).__module__,
    "parts": asyncio.run(parts()),
}))
"""


def run(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_threadgate_installs_and_loads_a_plugin_beside_a_users_own_app_package(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"  # what the wheel is built from
    shutil.copytree(REPO / "app", src / "app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", src
    )
    # setuptools warned in ~40 lines that app/static is not a listed package (issue 28).
    backend = [line for line in built.stderr.splitlines() if "Warning" in line]
    assert not backend, built.stderr
    (wheel,) = (tmp_path / "dist").glob("threadgate-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"threadgate", wheel.name.split("-py")[0] + ".dist-info"}, tops

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    )
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "threadgate_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        wheel,
    )

    project = tmp_path / "project"  # a user's FastAPI project, with its own `app` package
    (project / "app").mkdir(parents=True)
    (project / "app" / "__init__.py").write_text('NAME = "the user\'s app"\n')
    (project / "app" / "agent.py").write_text(USER_AGENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADGATE_")}
    out = run(python, "-c", CHECK, cwd=project, env={**env, "PYTHONPATH": str(project)})
    seen = json.loads(out.stdout)
    assert seen["threadgate"].startswith(str(site))  # the wheel's, not the source tree's
    assert seen["app"] == str(project / "app" / "__init__.py")
    assert seen["app_name"] == "the user's app" and seen["source"] == "app.agent"
    assert seen["parts"] == [["seen", {"by": "app.agent"}], "hello from the user's own app"]

    # The console script, run from the project without PYTHONPATH, finds the user's `app`
    # too: a path that names something missing in it fails the start, naming it.
    proc = subprocess.run(
        [venv / "bin" / "threadgate", "serve"],
        cwd=project,
        env={**env, "THREADGATE_MODEL": "app.agent:nothing"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "threadgate: THREADGATE_MODEL=app.agent:nothing: app.agent has no attribute nothing"
    ]
