"""A token store's pages: codebook usage per map and the rows, one row's maps (and its decodings
per depth with --tokenizer), and their pictures.

    /s/<n>?page=P                     usage histograms per map, the rows (paged)
    /s/<n>/row/<row>                  each token map of a row as a picture; decodings per depth
    /s/<n>/map/<row>/<k>.png          map k (0-based) drawn as its codes' colours
    /s/<n>/recon/<row>/<m>.png        the decoding after depth m (1-based), --tokenizer only
"""
from __future__ import annotations

import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from . import charts, images
from .sources import Source
from .web import page, picture, source_of

ROWS_PER_PAGE = 100
LOW_USAGE = 0.01            # what the tokenizer's trainer warns about: a map under 1% of its codes


def tokens_page(request: Request, src: Source):
    tokens = src.adapter
    try:
        number = max(0, int(request.query_params.get("page", 0)))
    except ValueError:
        number = 0
    rows, total = tokens.listing(number, ROWS_PER_PAGE)
    pages = max(1, math.ceil(total / ROWS_PER_PAGE))
    usage = [dict(u, svg=charts.usage_svg(u.pop("sorted")), low=u["fraction"] < LOW_USAGE) for u in tokens.usage()]
    base = f"/s/{src.number}"
    pager = {"first": base, "prev": f"{base}?page={number - 1}" if number > 0 else None,
             "next": f"{base}?page={number + 1}" if number + 1 < pages else None, "last": f"{base}?page={pages - 1}"}
    sample = int(len(tokens.tokens.sample_rows()))
    return page(request, "tokens.html", src=src, meta=tokens.meta, t=tokens.tokens, usage=usage, rows=rows,
                total=total, number=number, pages=pages, pager=pager, sample=sample,
                decoding=tokens.tokenizer_path is not None)


def incomplete_page(request: Request, src: Source):
    """An export still running; once its meta.json is there the store is opened and shown."""
    from ..info import Kind
    from ..info_facts import incomplete_token_store_facts
    from ..stores.tokens import TokenStoreError
    from .token_source import TokenSource

    if (src.path / "meta.json").is_file():
        try:
            src.adapter = TokenSource(src.path, request.app.state.tokenizer)
            src.kind = Kind("token_store")
            return tokens_page(request, src)
        except TokenStoreError:
            src.adapter = None          # not readable yet (or refused): still shown as incomplete
    return page(request, "tokens_incomplete.html", src=src, facts=incomplete_token_store_facts(src.path))


def row_page(request: Request):
    src = source_of(request, "tokens")
    tokens, r = src.adapter, request.path_params["row"]
    index = tokens.index_row(r)
    if index is None:
        raise HTTPException(404)
    maps = tokens.maps(r)
    shown = []
    for k, (m, (h, w)) in enumerate(zip(maps, tokens.tokens.map_shapes)):
        side = images.token_map_picture(m, tokens.tokens.vocab).shape[0]
        codes = " ".join(str(int(c)) for c in m.ravel()) if m.size <= 16 else None
        shown.append({"k": k, "shape": f"{h}x{w}", "side": side, "codes": codes,
                      "base": k < int(tokens.meta.get("num_base", 0))})
    nav = {"prev": r - 1 if r > 0 else None, "next": r + 1 if r + 1 < tokens.tokens.N else None}
    return page(request, "token_row.html", src=src, r=r, index=index, maps=shown, nav=nav,
                decoding=tokens.tokenizer_path is not None)


def map_picture(request: Request):
    src = source_of(request, "tokens")
    r, k = request.path_params["row"], request.path_params["k"]

    def make():
        pic = src.adapter.map_picture(r, k)
        return None if pic is None else images.encode(pic, "png")

    return picture(request, images.etag("map", src.path, src.adapter.stamp, r, k), make)


def reconstruction(request: Request):
    src = source_of(request, "tokens")
    tokens, r, m = src.adapter, request.path_params["row"], request.path_params["m"]
    if tokens.tokenizer_path is None or not (0 <= r < tokens.tokens.N and 1 <= m <= len(tokens.tokens.map_shapes)):
        raise HTTPException(404)
    tag = images.etag("recon", src.path, tokens.stamp, tokens.tokenizer_path, r, m)
    return picture(request, tag, lambda: images.encode(images.enlarge(tokens.reconstructions(r)[m - 1], 128)))


ROUTES = [
    Route("/s/{n:int}/row/{row:int}", row_page),
    Route("/s/{n:int}/map/{row:int}/{k:int}.png", map_picture),
    Route("/s/{n:int}/recon/{row:int}/{m:int}.png", reconstruction),
]
