"""The chat page: GET / and its static files (plain HTML, JS and CSS; no build step, no CDN),
and /docs, Swagger UI served from the pod's own files.

The page's client logic is threadgate-client (static/threadgate-client.js, a copy of
clients/js/index.js that a test keeps identical). It takes demo/testing query parameters:
`chunks`, `delay_ms`, `fail`, `fail_at`, `fail_attempts`, `vary`, `data_every` and
`refuse_continue` are sent as `model_options` with every message (the mock model honours
them), and `thread` opens that thread: `/?thread=demo&chunks=40&delay_ms=50&vary=1`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Everything the page loads comes from this origin; nothing inline, nothing third-party.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The chat page."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    """What browsers ask for when a page names no icon (the page names /static/favicon.svg)."""
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


# Swagger UI's files come with the fastapi-offline package: /docs loads nothing from another
# origin (without internet it used to be a blank page: FastAPI's default is a CDN).
DOCS_ASSETS = "/docs/assets"


def swagger_dir() -> Path:
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("the fastapi-offline package (Swagger UI's assets) is not installed")
    return Path(spec.origin).parent / "static"


DOCS_HEADERS = {
    "Cache-Control": "no-cache",
    # Same origin only: Swagger UI's inline start-up script and inline styles, nothing else.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def install(app: FastAPI) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html

    async def docs() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="threadgate API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            # No spec validator badge: it sends the spec to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers.update(DOCS_HEADERS)
        return page

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_dir()), name="docs-assets")
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
