"""Source files (Hugging Face Parquet files and WebDataset tars) as `decompose-dataset` sources:
listing, ids and labels, bad rows and members as error rows, a file that cannot be opened, and a
rerun of an interrupted store equal to an uninterrupted one. The files are written here (pyarrow,
tarfile) from real photos when ../shared/data is present."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nextdetail import cli
from nextdetail.decomp import ATParams
from nextdetail.imageio import load_image_bytes
from nextdetail.pipelines import DecomposeDatasetConfig, DecompositionStore, list_sources, run_job
from nextdetail.pipelines.sources import SourceError, scan_source
from nextdetail.pipelines.source_files import SourceFileOptions, hf_class_names, split_key
from nextdetail.stores.shards import BASES
from pipeline_data import NAMES, hf_shard, photo_paths, wds_shard

SIZE = 24
FAST = ["--size", str(SIZE), "--order", "2", "--n-iter", "6", "--backend", "numba"]


def tree_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def photos(tmp_path):
    return [p.read_bytes() for p in photo_paths(6, tmp_path)]


@pytest.fixture
def parquet_src(tmp_path, photos):
    src = tmp_path / "hf" / "data"
    src.mkdir(parents=True)
    hf_shard(src / "train-00000-of-00002.parquet", [photos[0], b"not an image at all", photos[1]], [0, 1, 2])
    hf_shard(src / "train-00001-of-00002.parquet", [photos[2], None, photos[3], photos[4]], [2, 0, None, 1])
    return tmp_path / "hf"


@pytest.fixture
def tar_src(tmp_path, photos):
    src = tmp_path / "wds"
    src.mkdir()
    wds_shard(src / "shard-000000.tar", [("000000", {"jpg": photos[0], "cls": b"1"}),
                                         ("000001", {"cls": b"2", "json": b"{}"}),        # no image
                                         ("000002", {"png": photos[1], "cls": b"zebra"}),  # bad label
                                         ("000003", {"png": photos[2], "cls": b"0"})])
    last = wds_shard(src / "shard-000001.tar", [("000004", {"png": photos[3], "cls": b"2"}),
                                                ("000005", {"png": photos[4]}),
                                                ("000006", {"png": photos[5], "cls": b"1"})])
    data = last.read_bytes()
    cut = data.rfind(photos[5][:64]) + len(photos[5]) // 2         # half of the last image's data
    last.write_bytes(data[:cut])
    return src


def test_split_key_follows_webdataset():
    assert split_key("a/b/0001.seg.png") == ("a/b/0001", "seg.png")
    assert split_key("0001.JPG") == ("0001", "jpg")
    assert split_key("README") == ("README", "")


def test_hf_class_names_come_from_the_schema_metadata(tmp_path, photos):
    path = hf_shard(tmp_path / "s.parquet", [photos[0]], [1])
    assert hf_class_names(pq.read_schema(path), "label") == NAMES
    assert hf_class_names(pq.read_schema(path), "other") is None
    assert hf_class_names(pa.schema([("label", pa.int64())]), "label") is None


def test_parquet_files_are_listed_by_footer_and_label_column(parquet_src):
    listing = scan_source(parquet_src)
    sources = list(listing)                 # files are listed as the iteration reaches them
    assert (listing.kind, listing.n_files, listing.failed) == ("parquet", 2, [])
    ids = [s.id for s in sources]
    assert ids == [f"data/train-00000-of-00002.parquet#{r}" for r in range(3)] + \
                  [f"data/train-00001-of-00002.parquet#{r}" for r in range(4)]
    assert [s.label for s in sources] == [0, 1, 2, 2, 0, -1, 1]
    assert [s.class_name for s in sources] == ["tench", "goldfish", "shark", "shark", "tench", None, "goldfish"]
    assert [s.index for s in sources] == list(range(7))
    # A glob of the same files lists the same images, ids relative to the glob's folder.
    globbed = scan_source(f"{parquet_src}/data/*.parquet")
    assert [s.id.split("#")[0] for s in globbed][:1] == ["train-00000-of-00002.parquet"]


def test_class_names_file_overrides(parquet_src):
    listing = scan_source(parquet_src, SourceFileOptions(class_names=("a", "b", "c")))
    assert [s.class_name for s in listing][:3] == ["a", "b", "c"]


def test_tar_files_group_members_by_key(tar_src):
    listing = scan_source(tar_src)
    sources = list(listing)
    assert (listing.kind, listing.n_files, listing.failed) == ("webdataset", 2, [])
    assert [s.id for s in sources] == [f"shard-000000.tar#00000{k}" for k in range(4)] + \
                                              [f"shard-000001.tar#00000{k}" for k in range(4, 7)]
    # 000006's .cls member came after its image, which the cut went through: no label.
    assert [s.label for s in sources] == [1, 2, -1, 0, 2, -1, -1]
    problems = {s.id.split("#")[1]: s.problem for s in sources if s.problem}
    assert problems == {"000001": "key group without an image (members: cls, json)",
                        "000002": "label 'zebra' is not an integer"}


def test_a_source_file_that_cannot_be_opened_is_named_and_the_rest_listed(parquet_src):
    (parquet_src / "data" / "train-00002-of-00002.parquet").write_bytes(b"PAR1 garbage")
    listing = scan_source(parquet_src)
    assert len(list(listing)) == 7 and len(listing.failed) == 1
    assert listing.failed[0].startswith(f"{parquet_src / 'data' / 'train-00002-of-00002.parquet'}: cannot open it as "
                                        f"Parquet (")
    with pytest.raises(SourceError, match="no image column 'img'"):
        scan_source(parquet_src / "data" / "train-00000-of-00002.parquet", SourceFileOptions(image_column="img"))


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_source_files_end_to_end(ray_session, kind, parquet_src, tar_src, photos, tmp_path, capsys):
    src = parquet_src if kind == "parquet" else tar_src
    store = tmp_path / "store"
    rc = cli.main(["decompose-dataset", str(src), "--out", str(store), "--shard-images", "3", *FAST])
    out, err = capsys.readouterr()
    assert rc == 1, err                                    # some rows are errors
    assert f"read 2 {kind} shards" in out.strip().splitlines()[-1]
    reader = DecompositionStore(store)
    m = reader.manifest.set_index("id")
    if kind == "parquet":
        bad = {"data/train-00000-of-00002.parquet#1": "not an image",
               "data/train-00001-of-00002.parquet#1": "null image"}
        good = {"data/train-00000-of-00002.parquet#0": photos[0], "data/train-00001-of-00002.parquet#3": photos[4]}
    else:
        bad = {"shard-000000.tar#000001": "key group without an image",
               "shard-000000.tar#000002": "label 'zebra' is not an integer",
               "shard-000001.tar#000006": "truncated tar member 000006.png"}
        good = {"shard-000000.tar#000000": photos[0], "shard-000001.tar#000005": photos[4]}
    for id_, reason in bad.items():
        assert m.loc[id_, "status"] == "error" and reason in m.loc[id_, "error"], (id_, m.loc[id_, "error"])
        assert f"{id_}: " in err
    assert (m["status"] == "ok").sum() == len(m) - len(bad)
    for id_, data in good.items():
        i = int(np.flatnonzero(reader.ok_indices == m.index.get_loc(id_))[0])
        np.testing.assert_array_equal(reader[i].image, load_image_bytes(data, id_, SIZE))
    assert reader.manifest["label"].tolist() == [s.label for s in list_sources(src)]


def test_an_interrupted_store_of_source_files_resumes_to_the_same_bytes(ray_session, parquet_src, tmp_path):
    def cfg(out, **kw):
        return DecomposeDatasetConfig(src=parquet_src, out=out, size=SIZE, order=2, params=ATParams(n_iter=6),
                                      backend="numba", shard_images=2, **kw)

    reference = run_job(cfg(tmp_path / "ref"))
    assert (reference.ok, reference.error) == (5, 2)
    # An "interrupted" run: the store created and two of its four shards written, then a rerun.
    from nextdetail.pipelines.decompose_worker import DecomposeWorker
    from pipeline_data import prepare_store, shard_rows, solve_shards

    plan = prepare_store(tmp_path / "cut", cfg(tmp_path / "cut").store_params("numba"), scan_source(parquet_src),
                         overwrite=False)
    w = DecomposeWorker(str(tmp_path / "cut"), plan.params.to_dict(), run=plan.run, batch_size=8, read_size=SIZE)
    solve_shards(plan, w, shard_rows(plan)[:2])
    report = run_job(cfg(tmp_path / "cut"))
    # Shard 0 (rows 0-1) holds the corrupt row: redone whole; shard 1 (rows 2 and 0') is kept.
    assert (report.skipped, report.ok) == (2, 5)
    assert tree_bytes(tmp_path / "cut" / BASES) == tree_bytes(tmp_path / "ref" / BASES)


def test_export_tokens_keeps_the_file_row_ids(tmp_path, parquet_src):
    """A store made from Parquet files exports like any other; the token store's index carries
    the file#row ids."""
    from nextdetail.pipelines.export import ExportConfig, export_in_process
    from nextdetail.pipelines.decompose_worker import DecomposeWorker
    from nextdetail.stores.store_plan import finish_store
    from nextdetail.stores.tokens import INDEX
    from pipeline_data import prepare_store, solve_shards
    from token_data import tiny_tokenizer

    store = tmp_path / "store"
    cfg = DecomposeDatasetConfig(src=parquet_src, out=store, size=16, order=3, params=ATParams(n_iter=4),
                                 backend="numba")
    plan = prepare_store(store, cfg.store_params("numba"), list_sources(parquet_src), overwrite=False)
    solve_shards(plan, DecomposeWorker(str(store), plan.params.to_dict(), run=plan.run, batch_size=8, read_size=16))
    finish_store(plan, src=str(parquet_src))
    ckpt = tiny_tokenizer(store, tmp_path / "tok", image_size=16, steps=1)
    export_in_process(ExportConfig(data=store, tokenizer=ckpt, out=tmp_path / "tokens"))
    ids = pq.read_table(tmp_path / "tokens" / INDEX).column("id").to_pylist()
    assert ids == DecompositionStore(store).manifest.query("status == 'ok'")["id"].tolist()
    assert ids[0] == "data/train-00000-of-00002.parquet#0" and len(ids) == 5


def test_class_names_file_is_read_and_an_unreadable_one_named(tmp_path):
    from nextdetail.errors import ConfigError

    names = tmp_path / "names.txt"
    names.write_text("tench\n goldfish \n\nshark\n")
    cfg = DecomposeDatasetConfig(src=tmp_path, out=tmp_path / "s", class_names=names, label_key=".txt")
    assert cfg.source_file_options().class_names == ("tench", "goldfish", "shark")
    assert cfg.source_file_options().label_key == "txt"
    with pytest.raises(ConfigError, match=r"^--class-names .*nope\.txt: cannot read it"):
        DecomposeDatasetConfig(src=tmp_path, out=tmp_path / "s",
                               class_names=tmp_path / "nope.txt").source_file_options()


def _label_only_files(folder, files: int, rows: int):
    """HF-layout Parquet files whose image cells are a few bytes: listing never reads them."""
    folder.mkdir(parents=True)
    for k in range(files):
        hf_shard(folder / f"train-{k:05d}.parquet", [b"x"] * rows, [i % 3 for i in range(rows)],
                 row_group_size=rows)
    return folder


def test_the_driver_holds_a_shard_of_the_listing_not_the_dataset(tmp_path, monkeypatch):
    """Listing, staging the manifest, planning and the job's windows of shard rows, for 4,000 and
    16,000 images in Parquet files: the driver's peak Python memory grows by a few bytes per
    image (the shard numbers), not by a listing of the images (measured: 2.6 vs 222 bytes per
    image when the listing is made a list)."""
    import tracemalloc

    from nextdetail.pipelines import decompose_job
    from nextdetail.pipelines.decompose_worker import shard_items
    from nextdetail.stores.store_check import check_store
    from nextdetail.stores.store_plan import plan_store

    monkeypatch.setattr(decompose_job, "WINDOW_SHARDS", 8)
    monkeypatch.setattr(decompose_job, "WINDOW_SHARDS_PER_ACTOR", 1)
    params = DecomposeDatasetConfig(src=tmp_path, out=tmp_path, size=SIZE, order=2,
                                    shard_images=16).store_params("numba")
    peaks = {}
    for n_shards in (2, 4, 16):          # 2: a warm-up (imports, caches)
        src = _label_only_files(tmp_path / f"src{n_shards}", n_shards, 1000)
        store = tmp_path / f"store{n_shards}"
        tracemalloc.start()
        plan = plan_store(store, params, check_store(store, params, scan_source(src), overwrite=False),
                          overwrite=False)
        rows = sum(len(shard_items(plan, w)) for w in decompose_job._windows(plan, workers=2))
        check = check_store(store, params, scan_source(src), overwrite=False)     # a rerun compares
        peaks[n_shards] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert rows == plan.n_images // 16 == check.n_images // 16 == n_shards * 1000 // 16
    # What grows is the plan's list of shard numbers (~36 bytes per shard of 16 images here,
    # ~3 bytes per image); a list of the images' Sources grows by ~220 bytes per image.
    per_image = (peaks[16] - peaks[4]) / (12 * 1000)
    assert per_image < 20, peaks


def test_a_job_in_several_windows_equals_one_window(ray_session, parquet_src, tmp_path, monkeypatch):
    from nextdetail.pipelines import decompose_job

    def cfg(out):
        return DecomposeDatasetConfig(src=parquet_src, out=out, size=SIZE, order=2, params=ATParams(n_iter=6),
                                      backend="numba", shard_images=2)

    one = run_job(cfg(tmp_path / "one"))
    monkeypatch.setattr(decompose_job, "WINDOW_SHARDS", 1)
    monkeypatch.setattr(decompose_job, "WINDOW_SHARDS_PER_ACTOR", 1)
    several = run_job(cfg(tmp_path / "several"))
    assert (several.ok, several.error, several.processed) == (one.ok, one.error, one.processed) == (5, 2, 7)
    assert tree_bytes(tmp_path / "several" / BASES) == tree_bytes(tmp_path / "one" / BASES)


def test_a_listing_that_fails_leaves_nothing_staged(tmp_path, parquet_src):
    from nextdetail.stores.manifest import LISTED
    from nextdetail.stores.store_check import check_store

    for f in (parquet_src / "data").iterdir():
        f.write_bytes(b"PAR1 garbage")
    params = DecomposeDatasetConfig(src=parquet_src, out=tmp_path, size=SIZE, order=2).store_params("numba")
    with pytest.raises(SourceError, match=r"no images found \(2 shards could not be opened; first: .*train-00000"):
        check_store(tmp_path / "store", params, scan_source(parquet_src), overwrite=False)
    assert not (tmp_path / "store" / LISTED).exists()
    # A listing left by a killed driver does not make the folder someone else's.
    (tmp_path / "store" / LISTED).write_bytes(b"half a listing")
    assert check_store(tmp_path / "store", params, [], overwrite=False).state == "new"
