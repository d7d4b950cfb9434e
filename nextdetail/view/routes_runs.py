"""Pages of runs, model folders, output folders and .npz batches, and their pictures.

    /s/<n>                        facts, charts, pictures (a run, a model folder, an output folder)
    /s/<n>/chart/<name>.png       a run's chart (routes' names: run_source.CHARTS), or eval-tokenizer's
                                  per-depth chart (depth-mse, depth-psnr, depth-lpips)
    /s/<n>/file/<path>            a picture file inside the folder (safety.safe_file: 404 otherwise)
    /s/<n>?page=P                 an .npz batch: its images, paged
    /s/<n>/npz/<j>.png            image j of an .npz batch
"""
from __future__ import annotations

import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Route

from . import charts, images
from .run_source import CHARTS, npz_image, npz_images
from .safety import safe_file
from .sources import Source
from .web import PICTURE_CACHE, page, picture, source_of

NPZ_PER_PAGE = 60
DEPTH_METRICS = ("mse", "psnr", "lpips")


def run_page(request: Request, src: Source):
    run = src.adapter
    facts = run.facts()
    evals = run.eval_rows() if src.kind.key == "eval_tokenizer" else None
    depth_charts = []
    if evals and evals["eval"]:
        depth_charts = [m for m in DEPTH_METRICS if any(_finite(r.get(m)) for r in evals["eval"])]
    return page(request, "run.html", src=src, facts=facts, charts=run.charts(), pictures=run.pictures(),
                evals=evals, depth_charts=depth_charts, card=run.card(), stamp=run.stamp)


def _finite(text) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def chart(request: Request):
    src = source_of(request, "run")
    run, name = src.adapter, request.path_params["name"]
    if name.startswith("depth-") and name[6:] in DEPTH_METRICS and src.kind.key == "eval_tokenizer":
        return picture(request, images.etag("chart", src.path, run.stamp, name),
                       lambda: charts.depth_chart(run.eval_rows()["eval"], name[6:]))
    if name not in CHARTS.get(src.kind.key, {}):
        raise HTTPException(404)

    def make():
        series, title, ylabel, log_y = run.chart_series(name)
        return charts.line_chart(series, title=title, ylabel=ylabel, log_y=log_y)

    return picture(request, images.etag("chart", src.path, run.stamp, name), make)


def file(request: Request):
    """A picture inside the folder, as stored (a PNG a command wrote); nosniff and the CSP of every
    response keep a file that is not a picture from being read as anything else."""
    src = source_of(request, "run")
    target = safe_file(src.path, request.path_params["rel"]) if src.path.is_dir() else None
    if target is None:
        raise HTTPException(404)
    return FileResponse(target, headers={"Cache-Control": PICTURE_CACHE})


def npz_page(request: Request, src: Source):
    facts = src.adapter.facts()
    n = int(facts.get("images", 0))
    try:
        number = max(0, int(request.query_params.get("page", 0)))
    except ValueError:
        number = 0
    pages = max(1, math.ceil(n / NPZ_PER_PAGE))
    number = min(number, pages - 1)
    labels = None
    if facts.get("labels"):
        from ..npz import read_labels
        labels = read_labels(src.path)
    items = [{"j": j, "label": None if labels is None else int(labels[j])}
             for j in range(number * NPZ_PER_PAGE, min(n, (number + 1) * NPZ_PER_PAGE))]
    base = f"/s/{src.number}"
    pager = {"first": base, "prev": f"{base}?page={number - 1}" if number > 0 else None,
             "next": f"{base}?page={number + 1}" if number + 1 < pages else None, "last": f"{base}?page={pages - 1}"}
    return page(request, "npz.html", src=src, facts=facts, items=items, number=number, pages=pages, pager=pager)


def npz_picture(request: Request):
    src = source_of(request, "npz")
    j = request.path_params["j"]
    if src.kind.key != "npz_batch" or not 0 <= j < npz_images(src.path)[1][0]:
        raise HTTPException(404)

    def make():
        img = npz_image(src.path, j)
        return None if img is None else images.encode(img, "png")

    return picture(request, images.etag("npz", src.path, src.adapter.stamp, j), make)


ROUTES = [
    Route("/s/{n:int}/chart/{name}.png", chart),
    Route("/s/{n:int}/file/{rel:path}", file),
    Route("/s/{n:int}/npz/{j:int}.png", npz_picture),
]
