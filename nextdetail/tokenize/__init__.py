"""The base-detail VQ-VAE tokenizer of CART (and the vanilla and multi-scale baselines).

    from nextdetail.tokenize import Tokenizer, config_for
    tok = Tokenizer.from_checkpoint("RUN/ckpt-0001000.pt")
    idx = tok.encode(image, bases)     # M int64 token maps (B, h_k, w_k)
    img = tok.decode(idx)              # (B, 3, H, W) in [0, 1]

config.py (typed configs), schedule.py (each quantizer's map schedule), model.py
(encoder/decoder), quant.py (codebook and the three quantizers), bases.py (stored bases as
inputs), tokenizer.py (the API), losses.py (LPIPS, the PatchGAN discriminator),
disc_stylegan.py (the StyleGAN2-style discriminator), loader.py (training batches from a
store), train.py (training), evaluate.py (eval-tokenizer), memory.py (memory estimates).
PyTorch is imported by this package; the rest of nextdetail does not need it.
"""
from ..errors import ConfigError
from .config import ModelConfig, QuantConfig, TokenizerConfig, scale_patch_sizes, config_for
from .tokenizer import CheckpointError, Tokenizer

__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "QuantConfig", "Tokenizer", "TokenizerConfig",
           "scale_patch_sizes", "config_for"]
