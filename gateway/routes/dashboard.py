"""The dashboard: `GET /` serves the page, `/static/*` its assets (package data, no CDN).

The page is plain HTML/CSS/JS with hand-drawn SVG charts; it reads the same /api/v1 routes
any other client uses, so it needs no route of its own beyond the files. Neither route is
part of the API, so both stay out of the OpenAPI schema.
"""

from __future__ import annotations

from pathlib import Path

from litestar import MediaType, Response, Router, get
from litestar.datastructures import CacheControlHeader
from litestar.static_files import create_static_files_router

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
INDEX = STATIC_DIR / "index.html"


@get("/", include_in_schema=False, media_type=MediaType.HTML)
async def index() -> Response[bytes]:
    """The one-screen dashboard page."""
    # Read per request (a few KB): an upgraded package is served without a restart, and
    # no-cache makes browsers revalidate instead of keeping a page from an older version.
    return Response(
        INDEX.read_bytes(),
        media_type=MediaType.HTML,
        headers={"Cache-Control": "no-cache"},
    )


static = create_static_files_router(
    path="/static",
    directories=[STATIC_DIR],
    name="dashboard-static",
    include_in_schema=False,
    cache_control=CacheControlHeader(no_cache=True),
)

router = Router(path="/", route_handlers=[index, static])
