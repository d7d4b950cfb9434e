"""The Starlette application of `nextdetail view`: the routes (routes_*.py, one file per kind of
source; what they share is web.py), the middleware, the index page and the stylesheet.

Every endpoint is a plain function: Starlette runs it in its thread pool, so a slow picture (a
decoding, a chart) never holds up the others.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.routing import Route

from .. import __version__
from . import routes_runs, routes_store, routes_tokens
from .sources import Source
from .web import HERE, SecurityHeaders, not_found, page, picture, source_of


def index(request: Request):
    return page(request, "index.html")


def style(request: Request):
    css = (HERE / "static" / "style.css").read_bytes()
    return picture(request, f'"css-{__version__}-{zlib.crc32(css):x}"', lambda: css, fmt="css")


_ICON = None


def favicon(request: Request):
    """A small square in the header's colour (a page without one gets a 404 in the browser's console)."""
    global _ICON
    if _ICON is None:
        import numpy as np

        from .images import encode

        icon = np.full((16, 16, 3), (31, 41, 51), np.uint8)
        icon[4:12, 4:12] = (43, 108, 176)
        _ICON = encode(icon)
    return picture(request, f'"icon-{__version__}"', lambda: _ICON)


def source_page(request: Request):
    """/s/<n>: the page of that source's kind."""
    src = source_of(request)
    show = {"store": routes_store.grid_page, "tokens": routes_tokens.tokens_page,
            "tokens_incomplete": routes_tokens.incomplete_page, "run": routes_runs.run_page,
            "npz": routes_runs.npz_page}[src.view]
    return show(request, src)


def create_app(sources: Sequence[Source], *, allowed_hosts: Optional[Sequence[str]] = None,
               tokenizer: Optional[Path] = None, per_page: int = 60) -> Starlette:
    """The application over `sources`. allowed_hosts: the Host headers answered (a guard against
    DNS rebinding: a web page elsewhere cannot make the browser read this server under its own
    name); None answers any."""
    routes = [Route("/", index), Route("/static/style.css", style), Route("/favicon.ico", favicon),
              Route("/s/{n:int}", source_page)]
    routes += routes_store.ROUTES + routes_tokens.ROUTES + routes_runs.ROUTES
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found})
    app.state.sources = list(sources)
    app.state.tokenizer = tokenizer
    app.state.per_page = per_page
    return app
