"""A decomposition store's pages: the paged, filtered, sortable grid of thumbnails, one image's
layers and manifest row, and their pictures.

    /s/<n>?page=P&status=S&class=C&label=L&sort=K     the grid (all query values optional)
    /s/<n>/image/<row>                                one image: bases, details, manifest row
    /s/<n>/thumb/<row>.webp                           B_0 shrunk to 128 px
    /s/<n>/layer/<row>/<name>.png                     one layer at full size (name: I, B_1, D_1, ...)
"""
from __future__ import annotations

import math
from typing import Optional
from urllib.parse import urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from . import images
from .sources import Source
from .store_query import Query
from .web import page, picture, source_of

STATUSES = ("ok", "error", "pending")


def _int(text: Optional[str], default: Optional[int]) -> Optional[int]:
    try:
        return int(text) if text not in (None, "") else default
    except ValueError:
        return default


def query_of(request: Request, energies) -> Query:
    """The grid's Query from the URL; values that are not ones the store can have are dropped."""
    p = request.query_params
    status = p.get("status", "")
    sort = p.get("sort", "")
    if sort.removesuffix("_asc") not in energies:
        sort = ""
    return Query(status=status if status in STATUSES else "", class_name=p.get("class", "")[:200],
                 label=_int(p.get("label"), None), sort=sort)


def _link(request: Request, **changes) -> str:
    """This page's URL with some query values changed (None removes one)."""
    params = dict(request.query_params)
    for k, v in changes.items():
        if v is None:
            params.pop(k, None)
        else:
            params[k] = str(v)
    return request.url.path + ("?" + urlencode(params) if params else "")


def grid_page(request: Request, src: Source):
    store = src.adapter
    lay = store.layout
    energies = store.energy_columns()
    q = query_of(request, energies)
    per_page = request.app.state.per_page
    number = max(0, _int(request.query_params.get("page"), 0))
    rows, total = store.grid(q, number, per_page)
    pages = max(1, math.ceil(total / per_page))
    if number >= pages and total:
        number = pages - 1
        rows, total = store.grid(q, number, per_page)
    sorts = [("", "store order")]
    for c in energies:
        k = c.split("_")[1]
        sorts += [(c, f"AT energy of level {k}, highest first"), (f"{c}_asc", f"AT energy of level {k}, lowest first")]
    pager = {"first": _link(request, page=None), "prev": _link(request, page=number - 1) if number > 0 else None,
             "next": _link(request, page=number + 1) if number + 1 < pages else None,
             "last": _link(request, page=pages - 1)}
    return page(request, "store.html", src=src, lay=lay, rows=rows, total=total, number=number, pages=pages,
                per_page=per_page, q=q, sorts=sorts, statuses=STATUSES, pager=pager, classes=store.classes(),
                sort_column=q.sort_column(), query=str(request.query_params))


def image_page(request: Request):
    src = source_of(request, "store")
    store, r = src.adapter, request.path_params["row"]
    row = store.row(r)
    if row is None:
        raise HTTPException(404)
    q, why = store.quantized(r, row)
    layers = []
    if q is not None:
        lay = store.layout
        for name in store.layer_names():
            scale = store.picture_of(q, name)[1] if name in lay.detail_names else None
            layers.append({"name": name, "scale": scale, "detail": name in lay.detail_names})
    back = request.query_params.get("back", "")
    nav = {"prev": r - 1 if r > 0 else None, "next": r + 1 if r + 1 < store.pages.rows else None}
    return page(request, "store_image.html", src=src, lay=store.layout, r=r, row=row, layers=layers, why=why,
                size=store.layout.size, shown=max(store.layout.size, 192), nav=nav,
                back=back if back.startswith(f"/s/{src.number}") else f"/s/{src.number}")


def thumb(request: Request):
    src = source_of(request, "store")
    r = request.path_params["row"]
    if not 0 <= r < src.adapter.pages.rows:
        raise HTTPException(404)
    tag = images.etag("thumb", src.path, src.adapter.stamp, r)
    return picture(request, tag, lambda: images.encode(src.adapter.thumbnail(r), "webp"), "webp")


def layer(request: Request):
    src = source_of(request, "store")
    r, name = request.path_params["row"], request.path_params["name"]

    def make():
        got = src.adapter.layer(r, name)
        return None if got is None else images.encode(got[0], "png")

    return picture(request, images.etag("layer", src.path, src.adapter.stamp, r, name), make, "png")


ROUTES = [
    Route("/s/{n:int}/image/{row:int}", image_page),
    Route("/s/{n:int}/thumb/{row:int}.webp", thumb),
    Route("/s/{n:int}/layer/{row:int}/{name}.png", layer),
]
