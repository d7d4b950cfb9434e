"""May this run write to STORE? The refusals, and what differs from the store that is there.

A rerun continues a store only when it asks for the store's parameters (recorded in bases.zarr's
attributes at creation) and lists the same images (compared with the manifest shard by shard,
streamed); anything else is refused in one line that names the difference, because continuing
would mix two datasets in one store. `--overwrite` replaces a store, never a folder that is not
one: it removes exactly the store's entries (STORE, an OutputFolder: nextdetail.stores.journal).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from .decomposition_format import (FORMAT, FORMAT_VERSION, LAYERS_V1, MANIFEST, META, PARTS, Source, StoreError,
                                   StoreParams, format_refusal)
from .journal import OutputFolder
from .manifest import ManifestShards, in_shards, stage_listing
from .shards import BASES, zarr_store
from ..storage import as_path

STORE = OutputFolder("decomposition store", (BASES, LAYERS_V1, MANIFEST, META, PARTS), StoreError, mark=BASES)


@dataclass
class StoreCheck:
    """What check_store found: the store's state ('new', or 'ours' when one is there), how
    many images SRC lists, and, when the store is to be created (or replaced), the manifest of
    the listing staged beside it (all rows pending; plan_store puts it in place)."""

    state: str
    n_images: int
    staged: Optional[Path] = None


def zarr_attributes(params: StoreParams, n_images: int) -> dict:
    """bases.zarr's attributes, where a store records what a rerun is compared with."""
    # No timestamps or host names: a resumed store must equal an uninterrupted one byte for byte.
    return {"nextdetail": {"format": FORMAT, "format_version": FORMAT_VERSION,
                           "params": params.to_dict(), "layer_order": params.layer_names(),
                           "images": n_images}}


def _stored_params(path: Path) -> StoreParams:
    import zarr

    try:
        attrs = dict(zarr.open_array(zarr_store(path / BASES, read_only=True), mode="r").attrs)["nextdetail"]
    except Exception as e:  # missing folder, broken zarr.json, no attribute
        raise StoreError(path, f"cannot read the parameters in {BASES} ({type(e).__name__}: {e}); "
                               f"pass --overwrite to start the store over") from None
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(path, f"store format {attrs.get('format')!r} version {attrs.get('format_version')!r}, "
                               f"this nextdetail writes version {FORMAT_VERSION}; pass --overwrite to replace it")
    try:
        return StoreParams.from_dict(attrs["params"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(path, f"{BASES} records incomplete parameters ({type(e).__name__}: {e}); pass "
                               f"--overwrite to start the store over") from None


def _format_1_meta(path: Path) -> dict:
    try:
        return json.loads(as_path(path / META).read_text())
    except (OSError, ValueError):
        return {}


def _source_differences(path: Path, params: StoreParams, sources: Iterable[Source]) -> Tuple[int, List[str]]:
    """(images listed, how they differ from the ones the store was made for), comparing shard by
    shard with the manifest's row groups: one shard of each in memory while they agree. After a
    first difference the ids from there on are gathered to say what was added or removed."""
    manifest = ManifestShards(path, params.shard_images)
    groups, m = params.shards(manifest.rows), params.shard_images
    n, first, changed, example, ids_after = 0, None, 0, None, []
    for k, part in enumerate(in_shards(sources, m)):
        n += len(part)
        if first is None:
            old = manifest.shard(k, ["id", "label"]).to_pydict() if k < groups else None
            if old is None or old["id"] != [s.id for s in part]:
                first = k
            else:
                bad = [s.id for s, label in zip(part, old["label"]) if s.label != label]
                changed += len(bad)
                example = example or (bad[0] if bad else None)
        if first is not None:
            ids_after += [s.id for s in part]
    if first is None and params.shards(n) != groups:
        first = params.shards(n)
    if first is None:
        return n, [f"{changed} labels changed (e.g. {example})"] if changed else []
    old_ids = [i for k in range(first, groups) for i in manifest.shard(k, ["id"]).column(0).to_pylist()]
    old_set, new_set = set(old_ids), set(ids_after)
    added = [i for i in ids_after if i not in old_set]
    removed = [i for i in old_ids if i not in new_set]
    out = []
    if added:
        out.append(f"{len(added)} images added (e.g. {added[0]})")
    if removed:
        out.append(f"{len(removed)} images removed (e.g. {removed[0]})")
    return n, out or ["the images are listed in another order"]


def check_store(path, wanted: StoreParams, sources: Iterable[Source], *, overwrite: bool,
                ignore: tuple = ()) -> StoreCheck:
    """Refuse (StoreError) a store this run may not continue; consume the listing once, streamed:
    compared with the manifest of a store to continue, else staged as the manifest of the store
    to create (see StoreCheck).

    ignore: parameter names not to compare yet (backend, before a cluster resolves auto).
    """
    path = as_path(path)
    state = STORE.state(path)
    if state == "foreign":
        raise StoreError(path, STORE.foreign_reason())
    if state == "new" or overwrite:
        return StoreCheck(state, *stage_listing(path, wanted, sources))
    if (path / LAYERS_V1).exists() and not (path / BASES).exists():
        raise StoreError(path, format_refusal(path, 1, _format_1_meta(path)))
    check_params(path, wanted, ignore)
    if (path / MANIFEST).exists():
        n, diffs = _source_differences(path, wanted, sources)
        if diffs:
            raise StoreError(path, f"store made from other images than SRC lists now: {'; '.join(diffs)}; "
                                   f"pass --overwrite to replace it")
        return StoreCheck(state, n)
    if (path / PARTS).exists():
        raise StoreError(path, f"store without {MANIFEST} but with a journal (damaged); pass --overwrite "
                               f"to start it over")
    # A creation that died before its manifest: nothing was processed; create it again.
    return StoreCheck(state, *stage_listing(path, wanted, sources))


def check_params(path: Path, wanted: StoreParams, ignore: tuple = ()) -> None:
    """StoreError unless the store at path records exactly the parameters `wanted`."""
    if not (path / BASES).exists():
        raise StoreError(path, f"store without {BASES} (damaged); pass --overwrite to start it over")
    diffs = _stored_params(path).differences(wanted, ignore=ignore)
    if diffs:
        raise StoreError(path, f"store made with other parameters: {'; '.join(diffs)}; rerun with the "
                               f"store's parameters, or pass --overwrite to replace it")
