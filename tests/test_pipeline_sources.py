"""Listing SRC: class folders -> sorted integer labels, .txt and .parquet listings, bad SRC."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nextdetail.pipelines import SourceError, list_sources
from pipeline_data import class_folder, synthetic_photo


def test_class_folders_give_sorted_labels_and_relative_ids(tmp_path):
    root = tmp_path / "src"
    for cls in ("zebra", "ant", "moth"):
        for i in range(2):
            synthetic_photo(root / cls / f"{i}.png", i, size=8)
    synthetic_photo(root / "loose.png", 9, size=8)
    (root / ".hidden").mkdir()
    synthetic_photo(root / ".hidden" / "x.png", 1, size=8)
    (root / "notes.txt").write_text("not listed: not an image suffix")
    src = list_sources(root)
    assert [s.id for s in src] == ["ant/0.png", "ant/1.png", "loose.png", "moth/0.png", "moth/1.png",
                                   "zebra/0.png", "zebra/1.png"]
    assert [s.index for s in src] == list(range(7))
    by_id = {s.id: s for s in src}
    assert (by_id["ant/1.png"].label, by_id["ant/1.png"].class_name) == (0, "ant")
    assert (by_id["moth/0.png"].label, by_id["zebra/0.png"].label) == (1, 2)
    assert (by_id["loose.png"].label, by_id["loose.png"].class_name) == (-1, None)
    assert all(os.path.isabs(s.path) and os.path.isfile(s.path) for s in src)


def test_imagefolder_layout_of_real_data(tmp_path):
    src = list_sources(class_folder(tmp_path))
    classes = sorted({s.class_name for s in src})
    assert [classes.index(s.class_name) for s in src] == [s.label for s in src]
    assert [s.id for s in src] == sorted(s.id for s in src)


def test_text_listing_relative_to_itself_with_optional_labels(tmp_path, monkeypatch):
    synthetic_photo(tmp_path / "data" / "my pic.png", 0, size=8)
    synthetic_photo(tmp_path / "data" / "b.png", 1, size=8)
    lst = tmp_path / "data" / "list.txt"
    lst.write_text("# comment\nmy pic.png 3\n\nb.png\n/abs/missing.png 0\n")
    monkeypatch.chdir(tmp_path)            # relative entries must not depend on the cwd
    src = list_sources(lst)
    assert [(s.id, s.label) for s in src] == [("my pic.png", 3), ("b.png", -1), ("/abs/missing.png", 0)]
    assert src[0].path == str(tmp_path / "data" / "my pic.png")
    assert src[2].path == "/abs/missing.png"          # listed, not checked: it becomes an error row


def test_parquet_listing_numbers_class_names(tmp_path):
    lst = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["x/1.png", "y/2.png", "x/3.png"],
                             "class_name": ["wolf", "bear", "wolf"]}), lst)
    src = list_sources(lst)
    assert [(s.id, s.label, s.class_name) for s in src] == [("x/1.png", 1, "wolf"), ("y/2.png", 0, "bear"),
                                                           ("x/3.png", 1, "wolf")]
    assert src[0].path == str(tmp_path / "x" / "1.png")


@pytest.mark.parametrize("content, message", [
    ("a.png\nb.png\na.png\n", "line 3: a.png is listed twice (first on line 1)"),
    ("a.png -2\n", "line 1: label must be an integer >= 0, got -2"),
    ("# only a comment\n", "no images found"),
])
def test_bad_text_listings_are_named(tmp_path, content, message):
    lst = tmp_path / "l.txt"
    lst.write_text(content)
    with pytest.raises(SourceError) as e:
        list_sources(lst)
    assert str(e.value) == f"{lst}: {message}"


def test_bad_src_is_named(tmp_path):
    with pytest.raises(SourceError, match=r"nope: no such file or folder$"):
        list_sources(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("path\n")
    with pytest.raises(SourceError, match=r"x\.csv: expected a folder, a \.txt/\.parquet listing, a Parquet shard "
                                          r"or a \.tar, got a \.csv file$"):
        list_sources(tmp_path / "x.csv")
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / "l.parquet")
    with pytest.raises(SourceError, match=r"no image column 'image' \(--image-column\) and no 'path' column "
                                          r"\(a listing\); it has file$"):
        list_sources(tmp_path / "l.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty: no images found$"):
        list_sources(tmp_path / "empty")
