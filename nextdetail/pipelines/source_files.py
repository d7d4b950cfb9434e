"""Source files that hold many images: Hugging Face Parquet files and WebDataset tars.

    SRC = one .parquet or .tar file, a folder holding them (at any depth), or a glob of them.

The driver lists source files and what they hold without decoding a pixel, one file at a time:

    parquet     the footer's row count, and the label column alone (column projection);
                class names from the file's `huggingface` schema metadata (a ClassLabel)
    webdataset  one pass over the tar's member headers, grouping members by key (the
                member's path up to the first "." of its file name); the small label
                members (KEY.cls) are read, the images are not

Each image becomes a Source whose `path` is its source file, `member` its row (Parquet) or key
(tar), and id "<file relative to SRC>#<row or key>". What listing already shows to be wrong (a
key group without an image, a label that is not an integer) travels as the Source's `problem`
and becomes an error row without a read. Workers read the images of a store shard with
`read_parquet_rows` / `read_tar_keys`: each source file opened once, its rows or keys read in order.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import NextDetailError, first_line
from ..imageio import IMAGE_EXTENSIONS
from ..storage import as_path, find_files, is_url, open_input
from ..stores.decomposition_format import NO_LABEL, Source

log = logging.getLogger(__name__)

PARQUET, WEBDATASET = "parquet", "webdataset"
SUFFIX = {PARQUET: ".parquet", WEBDATASET: ".tar"}
GLOB_CHARS = "*?["
_IMAGE_EXTS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class SourceFileOptions:
    """How to find images and labels in source files (the decompose-dataset options of the same names)."""

    image_column: str = "image"
    label_column: str = "label"
    class_names: Optional[Tuple[str, ...]] = None       # from --class-names FILE
    label_key: str = "cls"


def is_glob(src) -> bool:
    return any(c in str(src) for c in GLOB_CHARS) and not as_path(src).exists()


def source_file_kind(path: Path) -> Optional[str]:
    suffix = path.suffix.lower()
    return next((k for k, s in SUFFIX.items() if s == suffix), None)


def find_source_files(src) -> Tuple[Path, List[Path]]:
    """(root the ids are relative to, source files in sorted order) of a file, folder or glob."""
    if is_url(src):
        return _find_url_source_files(as_path(src))
    if is_glob(src):
        paths = sorted(Path(p) for p in glob.glob(str(src), recursive=True) if Path(p).is_file())
        base = str(src)[:min(str(src).find(c) for c in GLOB_CHARS if c in str(src))]
        root = Path(base) if base.endswith(os.sep) else Path(base).parent
        return root, paths
    src = Path(src)
    if src.is_file():
        return src.parent, [src]
    paths = sorted(p for p in src.rglob("*") if p.is_file() and source_file_kind(p) and not _hidden(p, src))
    return src, paths


def _find_url_source_files(src):
    """The same for a URL: a glob (fsspec's, one listing), one object, or every source file under
    a prefix (one paginated listing, not one request per folder)."""
    text = str(src)
    if any(c in text for c in GLOB_CHARS) and not src.exists():
        base = text[:min(text.find(c) for c in GLOB_CHARS if c in text)]
        root = as_path(base if base.endswith("/") else base.rsplit("/", 1)[0])
        return root, sorted((as_path(f"{src.protocol}://{k}") for k in src.fs.glob(src.path)
                             if src.fs.isfile(k)), key=str)
    if src.is_file():
        return src.parent, [src]
    paths = [as_path(url) for rel, url in find_files(src)
             if source_file_kind(Path(rel)) and not any(part.startswith(".") for part in rel.split("/"))]
    return src, paths


def _relative(path, root) -> str:
    if is_url(path):
        p, r = str(path), str(root).rstrip("/") + "/"
        return p[len(r):] if p.startswith(r) else p
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def iter_file_sources(root: Path, paths: Sequence[Path], kind: str, options: SourceFileOptions,
                      failed: List[str]) -> Iterator[Source]:
    """Every image of the source files, in (file, row/key) order, numbered from 0, listed one file
    at a time (so a million images are never all in memory); a file that cannot be opened is
    appended to `failed` as "<file>: <reason>" and skipped."""
    index = 0
    for path in paths:
        rel = _relative(path, root)
        try:
            items = _parquet_items(path, options) if kind == PARQUET else _tar_items(path, options)
        except SourceFileError as e:
            failed.append(f"{path}: {e}")
            continue
        where = str(path) if is_url(path) else str(path.resolve())
        for member, label, class_name, problem in items:
            yield Source(index, f"{rel}#{member}", where, label, class_name, member=member, problem=problem)
            index += 1


class SourceFileError(NextDetailError):
    """A source file (Parquet or tar) that cannot be opened or listed at all."""


# ----------------------------------------------------------------------------- Parquet (Hugging Face)

def hf_class_names(schema, label_column: str) -> Optional[List[str]]:
    """Class names of a ClassLabel column from the `huggingface` schema metadata that the
    `datasets` library writes ({"info": {"features": {label: {"_type": "ClassLabel", "names": [...]}}}})."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label_column]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None


def _parquet_items(path: Path, options: SourceFileOptions) -> Iterator[tuple]:
    try:
        f = open_input(path)
    except OSError as e:
        raise SourceFileError(f"cannot open it ({first_line(e, typed=True)})") from None
    with f:
        return _parquet_file_items(f, options)


def _parquet_file_items(f, options: SourceFileOptions) -> list:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise SourceFileError(f"cannot open it as Parquet ({first_line(e, typed=True)})") from None
    schema = pf.schema_arrow
    if options.image_column not in schema.names:
        raise SourceFileError(f"no image column {options.image_column!r} (columns: {', '.join(schema.names)}); "
                         f"see --image-column")
    n = pf.metadata.num_rows
    labels: list = [None] * n
    if options.label_column in schema.names:
        labels = pf.read(columns=[options.label_column]).column(0).to_pylist()
    names = list(options.class_names) if options.class_names is not None else \
        hf_class_names(schema, options.label_column)
    return [(row, *_label(value, names)) for row, value in enumerate(labels)]


def _label(value, names: Optional[List[str]]) -> tuple:
    """(label, class_name, problem) of a label value as found in a source file."""
    if value is None:
        return NO_LABEL, None, None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            text = value.decode() if isinstance(value, bytes) else str(value)
            value = int(text.strip())
        except (ValueError, UnicodeDecodeError):
            return NO_LABEL, None, f"label {value!r} is not an integer"
    if value < 0:
        return NO_LABEL, None, f"label {value} is negative"
    name = names[value] if names is not None and value < len(names) else None
    return value, name, None


def read_parquet_rows(path: str, rows: Sequence, image_column: str) -> Dict[object, object]:
    """{row: image bytes, or an error string} for the given rows (int, or as the manifest's member
    column writes them, text) of one Parquet file; reads only the row groups that hold them, and only
    the image column."""
    with open_input(path) as f:
        return _parquet_rows(f, rows, image_column)


def _parquet_rows(f, rows: Sequence, image_column: str) -> Dict[object, object]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    starts, at = [], 0
    for g in range(pf.num_row_groups):
        starts.append(at)
        at += pf.metadata.row_group(g).num_rows
    starts.append(at)
    asked = {int(r): r for r in rows}
    wanted = sorted(asked)
    got: Dict[int, object] = {}
    g = 0
    for r in wanted:
        if r >= at:
            break
        while starts[g + 1] <= r:
            g += 1
        if r in got:
            continue
        column = pf.read_row_group(g, columns=[image_column]).column(0).to_pylist()
        for rr in wanted:
            if starts[g] <= rr < starts[g + 1]:
                got[rr] = _image_bytes(column[rr - starts[g]])
    return {asked[r]: got.get(r, f"row {r} is not in the file ({at} rows)") for r in wanted}


def _image_bytes(value) -> object:
    """An HF image cell ({"bytes", "path"} struct, or plain binary) -> bytes, or an error string."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return "null image (no bytes in the image column)"
    if not isinstance(value, (bytes, bytearray)):
        return f"the image column holds {type(value).__name__}, not bytes"
    return bytes(value)


# ----------------------------------------------------------------------------- WebDataset tars

def split_key(name: str) -> Tuple[str, str]:
    """WebDataset's grouping: "dir/0001.seg.png" -> ("dir/0001", "seg.png")."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _image_ext(exts: Sequence[str]) -> Optional[str]:
    for ext in exts:
        if ext.rsplit(".", 1)[-1] in _IMAGE_EXTS:
            return ext
    return None


def _groups(tar: tarfile.TarFile) -> Iterator[Tuple[str, Dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) in tar order; members of one key are consecutive. A tar cut
    short raises after the group being read is yielded (its last member is the damaged one)."""
    key, members = None, {}
    entries = iter(tar)
    while True:
        try:
            m = next(entries)
        except StopIteration:
            break
        except (tarfile.TarError, OSError, EOFError):
            if key is not None:
                yield key, members
            raise
        if not m.isfile():
            continue
        k, ext = split_key(m.name)
        if k.rpartition("/")[2].startswith("."):           # hidden (e.g. macOS ._ files)
            continue
        if k != key and key is not None:
            yield key, members
            members = {}
        key = k
        members[ext] = m
    if key is not None:
        yield key, members


def _tar_items(path: Path, options: SourceFileOptions) -> list:
    try:
        f = open_input(path)
    except OSError as e:
        raise SourceFileError(f"cannot open it as a tar ({first_line(e, typed=True)})") from None
    with f:
        return _tar_file_items(f, path, options)


def _tar_file_items(f, path, options: SourceFileOptions) -> list:
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise SourceFileError(f"cannot open it as a tar ({first_line(e, typed=True)})") from None
    items = []
    names = list(options.class_names) if options.class_names is not None else None
    with tar:
        try:
            for key, members in _groups(tar):
                problem = None if _image_ext(list(members)) else \
                    f"key group without an image (members: {', '.join(sorted(members)) or 'none'})"
                label, class_name = NO_LABEL, None
                if options.label_key in members:
                    f = tar.extractfile(members[options.label_key])
                    label, class_name, bad = _label(f.read().decode("utf-8", "replace").strip(), names)
                    problem = problem or bad
                items.append((key, label, class_name, problem))
        except (tarfile.TarError, OSError, EOFError) as e:
            if not items:
                raise SourceFileError(f"cannot read it as a tar ({first_line(e, typed=True)})") from None
            log.warning("%s: the tar ends early (%s); %d key groups before that are used", path,
                        first_line(e, typed=True), len(items))
    return items


def read_tar_keys(path: str, keys: Sequence[str]) -> Dict[str, object]:
    """{key: image bytes, or an error string} for the given keys of one tar."""
    wanted = set(keys)
    out: Dict[str, object] = {}
    with open_input(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        try:
            for key, members in _groups(tar):
                if key not in wanted:
                    continue
                ext = _image_ext(list(members))
                if ext is None:
                    out[key] = "key group without an image"
                    continue
                try:
                    data = tar.extractfile(members[ext]).read()
                except (tarfile.TarError, OSError, EOFError) as e:
                    out[key] = f"truncated tar member {members[ext].name} ({first_line(e, typed=True)})"
                    continue
                out[key] = data if len(data) == members[ext].size else \
                    f"truncated tar member {members[ext].name} ({len(data)} of {members[ext].size} bytes)"
                if len(out) == len(wanted):
                    break
        except (tarfile.TarError, OSError, EOFError) as e:
            for key in wanted - out.keys():
                out[key] = f"not readable from the tar ({first_line(e, typed=True)})"
    return out
