"""What every page and picture of the viewer shares: the templates, the headers every response
carries, picture responses with ETags, the source a URL names, and the 404 page.

Headers on every response:
    X-Content-Type-Options: nosniff   a picture is never read as anything else
    Content-Security-Policy           no scripts at all, styles and pictures from this server only
    Referrer-Policy: no-referrer      paths of the data never leak in a Referer
Pictures also carry an ETag (what decides their bytes) and Cache-Control; a matching
If-None-Match gets 304 before anything is read or encoded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.templating import Jinja2Templates

from .. import __version__
from .sources import Source

HERE = Path(__file__).resolve().parent
CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", CSP.encode()),
                    (b"referrer-policy", b"no-referrer")]
PICTURE_CACHE = "private, max-age=300"      # revalidated by ETag after that: a store being written changes

MEDIA = {"css": "text/css; charset=utf-8", "png": "image/png", "webp": "image/webp", "jpg": "image/jpeg",
         "jpeg": "image/jpeg"}


def _num(value) -> str:
    """Thousands separators for ints, 4 significant digits for floats, '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["num"] = _num
templates.env.globals["version"] = __version__


class SecurityHeaders:
    """Pure ASGI middleware adding SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        return await self.app(scope, receive, with_headers)


def source_of(request: Request, view: Optional[str] = None) -> Source:
    """The source /s/<n> names (of that view, when given); 404 otherwise."""
    sources: List[Source] = request.app.state.sources
    n = request.path_params["n"]
    if not 0 <= n < len(sources) or (view is not None and sources[n].view != view):
        raise HTTPException(404)
    return sources[n]


def picture(request: Request, tag: str, make: Callable[[], Optional[bytes]], fmt: str = "png") -> Response:
    """A picture response: 304 when the client holds `tag`, else make()'s bytes (404 for None)."""
    headers = {"ETag": tag, "Cache-Control": PICTURE_CACHE}
    if request.headers.get("if-none-match") == tag:
        return Response(status_code=304, headers=headers)
    data = make()
    if data is None:
        raise HTTPException(404)
    return Response(data, media_type=MEDIA[fmt], headers=headers)


def page(request: Request, name: str, **context) -> HTMLResponse:
    context.setdefault("sources", request.app.state.sources)
    return templates.TemplateResponse(request, name, context)


def not_found(request: Request, exc: HTTPException):
    if exc.status_code != 404:
        return HTMLResponse(f"<h1>{exc.status_code}</h1>", status_code=exc.status_code)
    wants_html = "text/html" in request.headers.get("accept", "")
    if wants_html:
        return templates.TemplateResponse(request, "404.html", {"sources": request.app.state.sources},
                                          status_code=404)
    return Response("not found\n", status_code=404, media_type="text/plain")
