"""Node.js for the tests that run JavaScript: node and npm found, a package's modules installed.

`./scripts/test` installs node, npm and the packages before pytest starts; this is for a run
of pytest by itself. Under `CI`, anything missing fails the test (it never skips there).
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

from tests.conftest import unavailable


def need_node(package: Path) -> str:
    """node's path, once `package`'s node_modules match its package-lock.json."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable("needs node >= 18 and npm on PATH (./scripts/test installs them as root)")
    # Test workers share the checkout: one `npm ci` at a time, the others then find it done.
    with open(package / "package-lock.json", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed(package):
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=package,
                check=True,
                timeout=600,
            )
    return node


def installed(package: Path) -> bool:
    """Whether `npm ci` ran in `package` since its package-lock.json last changed."""
    done = package / "node_modules" / ".package-lock.json"
    return done.exists() and done.stat().st_mtime >= (package / "package-lock.json").stat().st_mtime
