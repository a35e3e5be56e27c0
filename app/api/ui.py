"""The chat page: GET / and its static files (plain HTML, JS and CSS; no build step, no CDN).

The page takes demo/testing query parameters: `chunks`, `delay_ms`, `fail`, `fail_at`,
`fail_attempts` are sent as `model_options` with every message (the mock model honours
them), and `thread` opens that thread: `/?thread=demo&chunks=40&delay_ms=50`.
"""

from __future__ import annotations

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


def install(app: FastAPI) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html

    async def docs() -> HTMLResponse:
        # TODO(first hour): serve the Swagger UI assets from the package, not a CDN.
        return get_swagger_ui_html(openapi_url="/openapi.json", title="threadgate API")

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
