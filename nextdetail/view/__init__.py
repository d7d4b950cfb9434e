"""`nextdetail view PATH...`: a local, read-only web page over stores, token stores, runs and
their outputs (Starlette + uvicorn, plain HTML from Jinja2 templates, a little CSS, no JavaScript).

    config.py        ViewConfig, the command's options
    serve.py         binds 127.0.0.1 (or --host, with a warning), a free port, prints the URL
    app.py           the Starlette application: sources, headers (caching, no sniffing, CSP), 404s
    routes_*.py      one file of pages and pictures per kind of source
    sources.py       what each PATH is (nextdetail.info.identify) -> its adapter
    store_source.py  a decomposition store read by row: manifest row groups, shards on demand
    store_query.py   paging, filters and sorting over a manifest in memory that does not grow with N
    token_source.py  a token store: rows memory-mapped, maps as pictures, codebook usage, decoding
    run_source.py    runs, model folders, sample/upscale/edit/eval folders, ADM .npz batches
    images.py        arrays -> PNG / WebP bytes (thumbnails, signed details, token maps)
    charts.py        loss curves and per-depth charts (matplotlib, Agg) and SVG histograms
    safety.py        the one check of a file path asked for in a URL

Nothing here writes a file or takes a folder lock: a store another job is writing is shown as it
stands (and reopened when it changes), and no code or pickle from the data is ever run (runs are
read from log.jsonl and file names; a tokenizer given with --tokenizer is loaded the way every
command loads one, weights only).
"""
