"""parley's web pages: plain HTML, JavaScript and CSS files shipped in this package (no build step,
nothing fetched from a CDN), served by `web_router`.

- `/`            the talk page: talk to an agent from the browser (docs/web.md)
- `/calls`       the calls console: live and recent calls, a call's event timeline (docs/web.md)
- `/static/NAME` the pages' scripts and styles: only the files named in `STATIC_FILES`
- `/api/agents`  the agents this server loaded (the talk page's picker), guarded like the other APIs

A page is added by naming its HTML in `PAGES` and its files in `STATIC_FILES`: nothing else in the
package is ever served, whatever the request asks for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import APIRouter, HTTPException
from fastapi.params import Depends
from fastapi.responses import Response

if TYPE_CHECKING:
    from parley.settings import Settings

# Route path -> the HTML file it serves.
PAGES: dict[str, str] = {"/": "index.html", "/calls": "calls.html"}
# Files under /static/ (the only ones: a name not listed is 404, so no path can reach other files).
STATIC_FILES: frozenset[str] = frozenset(
    {"common.js", "style.css", "talk.js", "audio-worklet.js", "calls.js", "calls.css"}
)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # a module worklet needs a JavaScript MIME type
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The files change with the package (an upgrade, a development checkout): the browser revalidates.
# The pages hold no secret (the token lives in the browser's sessionStorage), so no-store is not needed.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# A page must not be framed by another site (clickjacking the Talk button).
PAGE_HEADERS = {**HEADERS, "X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}


def read_file(name: str) -> bytes:
    """A file of this package (a listed name only: callers check)."""
    return resources.files(__name__).joinpath(name).read_bytes()


def content_type(name: str) -> str:
    suffix = name[name.rfind(".") :] if "." in name else ""
    return CONTENT_TYPES.get(suffix, "application/octet-stream")


def web_router(settings: Settings, *, dependencies: Sequence[Depends] = ()) -> APIRouter:
    """The pages and their static files (open: they hold nothing private), and `GET /api/agents`
    behind `dependencies` (the API token check, as for the calls and stats APIs)."""
    router = APIRouter()

    for path, page in PAGES.items():
        router.add_api_route(path, _page(page), methods=["GET"], include_in_schema=False)

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no such file: /static/{name[:80]}")
        return Response(read_file(name), media_type=content_type(name), headers=HEADERS)

    @router.get("/api/agents", dependencies=list(dependencies))
    async def agents() -> dict[str, object]:
        """The agents this server loaded, the default first (`?agent=NAME` on a media socket picks one)."""
        names = settings.agent_names
        return {"default": names[0], "agents": names}

    return router


def _page(name: str) -> Callable[[], Awaitable[Response]]:
    async def page() -> Response:
        return Response(read_file(name), media_type=content_type(name), headers=PAGE_HEADERS)

    page.__name__ = f"page_{name.replace('.', '_')}"
    return page


__all__ = ["CONTENT_TYPES", "PAGES", "STATIC_FILES", "content_type", "read_file", "web_router"]
