"""The build's identity: a digest of the package's source, baked into the image at build time.

The DBOS application version is `<package version>+<digest>` in an image (the Dockerfile runs
this file on `app/` and writes app/BUILD), `<package version>` in a checkout. Two builds of
different code never share a version, so DBOS never recovers one build's runs with another's
steps, whatever the image tag says; two builds of the same code do share it (they may recover
each other's runs: the steps are the same). Standard library only: the Dockerfile runs it
before anything is installed.

    python app/buildinfo.py app > app/BUILD
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

BUILD_FILE = "BUILD"
SKIPPED_DIRS = {"__pycache__"}


def source_digest(root: Path) -> str:
    """12 hex digits of SHA-256 over every file under `root` (relative path and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.name == BUILD_FILE or rel.suffix == ".pyc" or SKIPPED_DIRS & set(rel.parts):
            continue
        digest.update(rel.as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def build_id() -> str:
    """The digest written into this installed package at build time ("" in a checkout)."""
    path = Path(__file__).with_name(BUILD_FILE)
    return path.read_text().strip() if path.is_file() else ""


def app_version(version: str) -> str:
    """The DBOS application version of this code: the package version, plus the build's."""
    build = build_id()
    return f"{version}+{build}" if build else version


if __name__ == "__main__":
    print(source_digest(Path(sys.argv[1])))
