"""stores.journal: the one rule of resumable output folders (kinds, claim, --overwrite, recorded
settings and their differences)."""
from dataclasses import dataclass, field

import pytest

from nextdetail.errors import PathError
from nextdetail.stores.journal import OutputFolder, differences, recorded

KIND = OutputFolder("thing store", ("data.bin", "meta.json", "ckpt-*.pt"), mark="data.bin")


def test_state_claim_and_overwrite_touch_only_the_kinds_entries(tmp_path):
    out = tmp_path / "out"
    assert KIND.state(out) == "new"
    out.mkdir()
    (out / ".nextdetail.lock").write_text("{}")              # dot names are never the kind's
    assert KIND.claim(out) == "new"
    (out / "ckpt-0000002.pt").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    assert KIND.claim(out) == "ours"
    assert KIND.claim(out, overwrite=True) == "new"
    assert sorted(p.name for p in out.iterdir()) == [".nextdetail.lock", "notes.txt"]
    with pytest.raises(PathError, match=r"is not a thing store \(no data.bin\); choose another --out "
                                        r"\(--overwrite only ever replaces a thing store\)"):
        KIND.claim(out, overwrite=True)                       # a foreign folder is never emptied
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(PathError, match="exists and is not a folder"):
        KIND.state(tmp_path / "file")


def test_recorded_writes_once_then_reads_back(tmp_path):
    path = tmp_path / "parts" / "settings.json"
    assert recorded(path, {"seed": 1}) is None
    assert recorded(path, {"seed": 2}) == {"seed": 1}          # the first settings stay


@dataclass(frozen=True)
class Inner:
    n_iter: int = 50


@dataclass(frozen=True)
class Outer:
    order: int = 3
    inner: Inner = field(default_factory=Inner)


def test_differences_of_settings_and_configs():
    assert differences({"seed": 1, "n": 4}, {"seed": 2, "n": 4}) == ["seed 1 != 2"]
    assert differences({"a": 1}, {"b": 2}) == ["b None != 2", "a 1 != None"]
    names = {"seed": "another seed", "n": "another n"}
    assert differences({"seed": 1, "n": 3}, {"seed": 2, "n": 4}, names=names) == ["another seed", "another n"]
    a, b = Outer(), Outer(order=2, inner=Inner(n_iter=30))
    assert differences(a, b, labels=("store", "this run")) == ["order 3 (store) != 2 (this run)",
                                                               "inner.n_iter 50 (store) != 30 (this run)"]
    assert differences(a, b, flatten=True, value=str) == ["order 3 != 2", "n-iter 50 != 30"]
    assert differences(a, b, ignore=("order", "inner")) == []
