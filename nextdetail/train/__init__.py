"""Training on cached tokens (read by nextdetail.stores.tokens): the next-detail transformer
(model.py), its continuous inputs from the tokenizer's quantizer (inputs.py), the trainer
(trainer.py: `nextdetail train`), the epoch order (sampler.py) and what a step needs in memory
(memory.py). Drawing from a trained model is nextdetail.generate. Only the reader and the epoch
order are imported here; the others import torch and are imported by path, e.g.
`from nextdetail.train.trainer import train`.

    from nextdetail.train import TokenDataset, EpochSampler
    ds = TokenDataset("TOKENS")                   # exported by `nextdetail export-tokens`
    sampler = EpochSampler(len(ds), batch_size=256, seed=0, rank=rank, world_size=world)
    tokens_BL, labels_B = ds.get_batch(sampler.next_batch())
    maps = ds.split_maps(tokens_BL)               # [r_1 .. r_M], (B, h_k, w_k) views
"""
from ..stores.tokens import TokenDataset, TokenStoreError, read_token_meta
from .sampler import EpochSampler

__all__ = ["EpochSampler", "TokenDataset", "TokenStoreError", "read_token_meta"]
