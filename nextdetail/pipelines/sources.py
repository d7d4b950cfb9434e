"""What a dataset job decomposes: SRC as an ordered list of images.

SRC is loose image files (a folder, or a .txt/.parquet listing of paths) or source files that
hold many images each (Hugging Face Parquet files, WebDataset tars: see source_files.py), told
apart by `scan_source`:

- A folder: every image file under it, found by `nextdetail.imageio.list_images` (sorted by
  relative path). Its non-hidden immediate sub-folders are classes, labelled 0, 1, ... in
  sorted name order, as torchvision's ImageFolder (the ImageNet train layout) does; an
  image directly in SRC has no class (label -1).
- A .txt listing: one image path per line, optionally followed by whitespace and an
  integer label >= 0. Blank lines and lines starting with # are skipped.
- A .parquet listing: a `path` column, optional integer `label` and string `class_name`
  columns; class names without labels are numbered in sorted order, like folders.

Relative paths in a listing are taken relative to the listing's own folder, so it works
from any working directory. The id of an image, which names it in the store, is its path
relative to SRC (folders) or its path as written in the listing: it does not change when
the data moves. Files are not opened here; a missing or broken one becomes an error row.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from ..errors import PathError
from ..imageio import IMAGE_EXTENSIONS, FolderError, walk_image_files
from ..storage import as_path, find_files, is_url, open_input
from ..stores.decomposition_format import NO_LABEL, Source
from .source_files import SourceFileOptions, find_source_files, is_glob, iter_file_sources, source_file_kind

log = logging.getLogger(__name__)

FOLDER, LISTING = "folder", "listing"


class SourceError(PathError):
    """SRC cannot be listed; str is one line "<SRC>: <reason>"."""


class SourceListing:
    """SRC as found: its kind (folder, listing, parquet, webdataset) and, iterated, its images in
    store order (Sources numbered 0, 1, ...).

    Loose files are listed when SRC is scanned (sorting a folder walk needs every name). Source
    files (Parquet, tar) are listed as the iteration reaches them, one at a time, so the driver
    never holds the Sources of a million images in them; `failed` ("<file>: <reason>", files that
    could not be opened) is filled as they are met, and an iteration that finds no image at all
    raises SourceError. `n_files` counts the source files."""

    def __init__(self, kind: str, src, sources: Optional[List[Source]] = None, *, files: Sequence[Path] = (),
                 root: Optional[Path] = None, options: Optional[SourceFileOptions] = None):
        self.kind, self.src, self._sources = kind, src, sources
        self._paths, self._root, self._options = list(files), root, options
        self.n_files = len(self._paths)
        self.failed: List[str] = []

    def __iter__(self) -> Iterator[Source]:
        if self._sources is not None:
            yield from self._sources
            return
        self.failed = []
        found = 0
        for source in iter_file_sources(self._root, self._paths, self.kind, self._options, self.failed):
            found += 1
            yield source
        if not found:
            raise _no_images(self.src, self.failed)

    def describe(self) -> str:
        """What was read, for the summary line (after iterating, for source files). The words
        are the Hub's: a Parquet or tar file of a dataset is one of its shards."""
        if self.kind == FOLDER:
            return "read a folder of image files"
        if self.kind == LISTING:
            return "read a listing of image files"
        failed = f" ({len(self.failed)} could not be opened)" if self.failed else ""
        return f"read {self.n_files} {self.kind} shards{failed}"


def _no_images(src, failed: List[str]) -> SourceError:
    more = f" ({len(failed)} shards could not be opened; first: {failed[0]})" if failed else ""
    return SourceError(src, f"no images found{more}")


def list_sources(src, options: Optional[SourceFileOptions] = None) -> List[Source]:
    """SRC -> all its images in store order, in a list. Raises SourceError."""
    return list(scan_source(src, options))


def scan_source(src, options: Optional[SourceFileOptions] = None) -> SourceListing:
    """Tell what SRC is; list it when it is loose files (source files are listed when iterated).
    Raises SourceError when it cannot be listed or holds no image."""
    options = options or SourceFileOptions()
    if is_glob(src):
        return _source_files(src, options)
    src = as_path(src)
    if is_url(src):
        _check_reachable(src)
    if src.is_dir():
        items = _from_url_folder(src) if is_url(src) else _from_folder(src)
        return SourceListing(FOLDER, src, _numbered(items)) if items else _source_files(src, options)
    if src.is_file():
        suffix = src.suffix.lower()
        if suffix == ".txt":
            return _listed(LISTING, src, _numbered(_from_text(src)))
        if suffix == ".parquet" and _is_path_listing(src, options):
            return _listed(LISTING, src, _numbered(_from_parquet(src)))
        if source_file_kind(src):
            return _source_files(src, options)
        raise SourceError(src, f"expected a folder, a .txt/.parquet listing, a Parquet shard or a .tar, "
                               f"got a {suffix or 'suffix-less'} file")
    if src.exists():
        raise SourceError(src, "is neither a folder nor a regular file")
    raise SourceError(src, "no such file or folder")


def _listed(kind: str, src, sources: List[Source]) -> SourceListing:
    if not sources:
        raise _no_images(src, [])
    return SourceListing(kind, src, sources)


def _numbered(items) -> List[Source]:
    return [Source(i, *item) for i, item in enumerate(items)]


def _is_path_listing(src: Path, options: SourceFileOptions) -> bool:
    """A .parquet SRC is a listing when it has a `path` column and no image column."""
    import pyarrow.parquet as pq

    try:
        with open_input(src) as f:
            names = pq.read_schema(f).names
    except Exception as e:  # not Parquet at all
        raise SourceError(src, f"cannot read it as Parquet ({e})") from None
    if options.image_column in names:
        return False
    if "path" in names:
        return True
    raise SourceError(src, f"no image column {options.image_column!r} (--image-column) and no 'path' column "
                           f"(a listing); it has {', '.join(names) or 'none'}")


def _source_files(src, options: SourceFileOptions) -> SourceListing:
    root, paths = find_source_files(src)
    if not paths:
        raise _no_images(src, [])
    kinds = {source_file_kind(p) for p in paths}
    if len(kinds) > 1:
        raise SourceError(src, "holds both Parquet files and tars; point SRC at one kind")
    listing = SourceListing(kinds.pop(), src, files=paths, root=root, options=options)
    if not is_glob(src) and as_path(src).is_file():
        # One source file named as SRC: list it now (it is one file), and a problem with it is
        # a problem with SRC.
        failed: List[str] = []
        sources = list(iter_file_sources(root, paths, listing.kind, options, failed))
        if failed:
            raise SourceError(src, failed[0][len(f"{src}: "):])
        listing = SourceListing(listing.kind, src, sources, files=paths)
    return listing


def _from_folder(src: Path) -> list:
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    label_of = {name: k for k, name in enumerate(classes)}
    items = []
    try:
        files = walk_image_files(os.path.abspath(src))   # not list_images: a folder of source files holds no images
    except FolderError as e:
        raise SourceError(src, str(e)) from None
    for rel, path in files:
        cls = rel.split("/", 1)[0] if "/" in rel else None
        items.append((rel, path, label_of.get(cls, NO_LABEL), cls))
    found = {cls for *_, cls in items}
    empty = [c for c in classes if c not in found]
    if empty and items:
        # ImageFolder numbers every class folder, so an empty one still takes a label.
        log.warning("%s: class folders without images (they keep their labels): %s",
                    src, ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    return items


def _check_reachable(src) -> None:
    """A URL's bucket must exist: otherwise a prefix just looks empty ('no such file or folder')."""
    from ..storage import bucket
    try:
        src.fs.info(bucket(src).partition("://")[2])
    except FileNotFoundError:
        raise SourceError(src, f"no such bucket {bucket(src)}") from None


def _from_url_folder(src) -> list:
    """_from_folder for a URL prefix: one paginated listing of every object under it (class
    folders are the first level of the keys: object stores have no empty folders)."""
    items = []
    for rel, url in find_files(src):
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        cls = parts[0] if len(parts) > 1 else None
        items.append((rel, url, cls))
    label_of = {name: k for k, name in enumerate(sorted({c for *_, c in items if c is not None}))}
    return [(rel, url, label_of.get(cls, NO_LABEL), cls) for rel, url, cls in items]


def _resolve(listing, written: str) -> str:
    if is_url(written):
        return written
    if is_url(listing):
        # relative to the listing's own prefix; an absolute path stays a path on the workers
        return written if written.startswith("/") else f"{str(listing).rsplit('/', 1)[0]}/{written}"
    p = Path(written).expanduser()
    return os.path.abspath(p if p.is_absolute() else listing.parent / p)


def _from_text(src: Path) -> list:
    try:
        lines = as_path(src).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(src, f"cannot read the listing ({e})") from None
    items, seen = [], {}
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path, label = text, NO_LABEL
        parts = text.rsplit(None, 1)
        # "path label": the last field is a label only when it is an integer, so paths
        # with spaces still work.
        if len(parts) == 2 and parts[1].lstrip("+-").isdigit():
            path, label = parts[0], int(parts[1])
            if label < 0:
                raise SourceError(src, f"line {lineno}: label must be an integer >= 0, got {label}")
        key = path if is_url(path) else Path(path).as_posix()
        if key in seen:
            raise SourceError(src, f"line {lineno}: {path} is listed twice (first on line {seen[key]})")
        seen[key] = lineno
        items.append((key, _resolve(src, path), label, None))
    return items


def _from_parquet(src: Path) -> list:
    import pyarrow.parquet as pq

    try:
        with open_input(src) as f:
            table = pq.read_table(f)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise SourceError(src, f"cannot read the listing as Parquet ({e})") from None
    cols = table.column_names          # has `path`: scan_source sends only such files here
    paths = table.column("path").to_pylist()
    labels = table.column("label").to_pylist() if "label" in cols else [None] * len(paths)
    names = table.column("class_name").to_pylist() if "class_name" in cols else [None] * len(paths)
    if "label" not in cols and "class_name" in cols:
        numbering = {c: k for k, c in enumerate(sorted({c for c in names if c is not None}))}
        labels = [numbering.get(c) for c in names]
    items, seen = [], {}
    for row, (path, label, cls) in enumerate(zip(paths, labels, names)):
        if not isinstance(path, str) or not path:
            raise SourceError(src, f"row {row}: path must be a non-empty string, got {path!r}")
        if label is None:
            label = NO_LABEL
        elif int(label) != label or label < 0:
            raise SourceError(src, f"row {row}: label must be an integer >= 0, got {label!r}")
        key = path if is_url(path) else Path(path).as_posix()
        if key in seen:
            raise SourceError(src, f"row {row}: {path} is listed twice (first in row {seen[key]})")
        seen[key] = row
        items.append((key, _resolve(src, path), int(label), cls))
    return items
