"""Every link a reader can follow resolves: the markdown docs' links and anchors, and /docs
(Swagger UI) loads only files the pod serves itself."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from threadgate.api import ui

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "k8s" / "README.md"])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<(https?://[^>]+)>")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]+`")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    text = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in ("L", "N"))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", path.read_text()))
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(
                f"{target}: no {dest.relative_to(REPO) if REPO in dest.parents else dest}"
            )
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{doc.relative_to(REPO)}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_markdown_files_named_in_the_text_exist(doc: Path) -> None:
    """A `NAME.md` cited in running text must be in the repository (a reader goes looking)."""
    text = FENCE.sub("", doc.read_text())
    names = set(re.findall(r"`([\w./-]+\.md)`", text))
    missing = [n for n in names if not (doc.parent / n).exists() and not (REPO / n).exists()]
    assert not missing, f"{doc.relative_to(REPO)} cites {missing}, not in the repository"


def test_the_slugs_are_githubs() -> None:
    assert slug("HTTP API") == "http-api"
    assert slug("Run lifecycle") == "run-lifecycle"
    assert slug("The CLI: exit statuses") == "the-cli-exit-statuses"
    assert slug("`threadgate dev` and a crash") == "threadgate-dev-and-a-crash"


async def test_swagger_ui_loads_only_same_origin_files() -> None:
    app = FastAPI(docs_url=None, redoc_url=None)
    ui.install(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pod") as http:
        page = await http.get("/docs")
        assert page.status_code == 200
        html = page.text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        urls += re.findall(r"""\burl:\s*['"]([^'"]+)['"]""", html)
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls), html
        assert any(u.endswith("swagger-ui.css") for u in urls), html
        assert "/openapi.json" in urls
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), f"{url} is not same-origin"
        # Nothing in the page points anywhere else (the spec validator badge included).
        assert not re.findall(r"https?://", html), re.findall(r"https?://[^\s'\"]+", html)
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for url in urls:
            resp = await http.get(url)
            assert resp.status_code == 200, url
            assert len(resp.content) > 0, url
        js = await http.get("/docs/assets/swagger-ui-bundle.js")
        assert "javascript" in js.headers["content-type"]
        assert b"SwaggerUIBundle" in js.content
