"""The tokenizer's data stream (nextdetail.tokenize.loader): the batches depend on the seed and
the lanes alone, not on the number of loader workers or processes; a resume continues the
stream exactly; ranks read disjoint shares of each epoch; the inputs are what the store's
reader gives."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nextdetail.pipelines import DecompositionStore
from nextdetail.stores.layers import split_layers
from nextdetail.stores.shards import layers_from_bases
from nextdetail.tokenize.bases import inputs_from_bases as bases_inputs
from nextdetail.tokenize.loader import StoreLoader, _Blocks
from pipeline_data import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 10 images in shards of 3 (the last one partial): blocks of 5 images straddle shards.
    return DecompositionStore(make_store(tmp_path_factory.mktemp("loader") / "store", n=10, size=24, order=3,
                                         n_iter=2, shard_images=3))


def stream(store, steps=12, batch_size=4, resume_at=None, **kw):
    kw = {"seed": 3, "buffer": 5, **kw}
    loader = StoreLoader(store, 16, batch_size, **kw)
    out = []
    for step in range(steps):
        if step == resume_at:                   # a new process resumes from the saved state
            state = loader.state_dict()
            loader = StoreLoader(store, 16, batch_size, **kw)
            loader.load_state_dict(state)
        out.append(loader.next())
    return torch.stack(out)


def test_batches_do_not_depend_on_loader_workers_and_resume_exactly(store):
    ref = stream(store)                         # 12 steps x 4 = 48 images: several epochs of 10
    assert ref.shape == (12, 4, 4, 3, 16, 16) and ref.dtype == torch.uint8
    assert torch.equal(ref, stream(store, workers=1))
    assert torch.equal(ref, stream(store, workers=2))
    assert torch.equal(ref, stream(store, workers=2, resume_at=5))
    assert torch.equal(ref, stream(store, resume_at=7))
    assert not torch.equal(ref, stream(store, seed=4))


def test_ranks_see_together_what_one_process_with_their_lanes_sees(store):
    one = stream(store, batch_size=4, lanes=2)
    ranks = [stream(store, batch_size=2, lanes=2, world=2, rank=r, workers=r) for r in range(2)]
    assert torch.equal(one, torch.cat(ranks, dim=1))


def test_each_epoch_is_split_into_disjoint_lanes(store):
    loader = StoreLoader(store, 16, 2, seed=3, lanes=2, world=2, buffer=5)
    plan = loader.plan
    blocks = _Blocks(plan, [0, 1], 0)
    for epoch in range(3):
        seen = [np.concatenate([blocks.block(epoch, lane, j)[0].numpy() for j in range(plan.blocks)])
                for lane in (0, 1)]
        assert len(seen[0]) == len(seen[1]) == 5
        assert not set(seen[0]) & set(seen[1])                     # no image in both lanes
        assert len(set(seen[0]) | set(seen[1])) == 10              # every image once
    # Shards are visited in another order every epoch.
    assert not np.array_equal(plan.epoch_order(0), plan.epoch_order(1))


def test_inputs_are_what_the_store_reader_gives(store):
    q = StoreLoader(store, 24, 3, seed=0).next()
    image, bases = bases_inputs(q, 3)
    ref_image, ref_bases = split_layers(torch.from_numpy(layers_from_bases(q.numpy())), 3)
    assert torch.equal(image, ref_image) and all(torch.equal(a, b) for a, b in zip(bases, ref_bases))
    # Full-size crops of the stored images: each is one of the store's images, bit for bit.
    stored = {store.quantized(i).tobytes() for i in range(len(store))}
    assert all(x.numpy().tobytes() in stored for x in q)


def test_bad_settings_are_refused(store):
    with pytest.raises(ValueError, match="--loader-lanes 3 is not a multiple of the 2 processes"):
        StoreLoader(store, 16, 4, seed=0, lanes=3, world=2)
    with pytest.raises(ValueError, match="--batch-size 3 is not a multiple of the 2 lanes"):
        StoreLoader(store, 16, 3, seed=0, lanes=2)
    with pytest.raises(ValueError, match="10 ok images cannot fill 16 lanes"):
        StoreLoader(store, 16, 16, seed=0, lanes=16)
    loader = StoreLoader(store, 16, 4, seed=0)
    with pytest.raises(ValueError, match="data stream has lanes 1, this run 2"):
        StoreLoader(store, 16, 4, seed=0, lanes=2).load_state_dict(loader.state_dict())
