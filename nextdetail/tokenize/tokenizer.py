"""The tokenizer: encoder + one of the quantizers + decoder, and its public API.

    tok = Tokenizer.from_checkpoint("RUN/ckpt-0001000.pt")
    idx = tok.encode(image_B3HW, bases=[B_1, ..., B_n])   # list of M int64 (B, h_k, w_k) in [0, V)
    img = tok.decode(idx)                                 # float32 (B, 3, H, W) in [0, 1]

Images and bases are float (B, 3, H, W) in [0, 1] (the decomposition store's range), H = W =
config.image_size; bases B_1..B_n (B_1 finest) are needed by the base-detail quantizer only,
the others ignore them. A tokenizer of a log-space decomposition (intrinsic) takes them in the
store's unit-log space t (stores/shards.py) and `decode` returns pixels (`to_pixels`). Inside, pixels are mapped to [-1, 1] ("model space", what LPIPS and the
decoder use); `forward` returns the reconstruction in model space for the training losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError, NextDetailError
from .config import TokenizerConfig
from .model import Decoder, Encoder
from .quant import QuantOut, build_quantizer


class CheckpointError(NextDetailError, ValueError):
    """A checkpoint that cannot be loaded as asked; str is one line naming the file."""


@dataclass
class TokenizerOut:
    x_hat: torch.Tensor          # (B, 3, H, W) reconstruction, model space [-1, 1]
    q: QuantOut                  # f_hat, token maps, vq loss, per-map contributions and inputs


# Images per encoder call in `Tokenizer.encode`. On the CPU one image costs the same per image
# as eight (measured at 64 px, ch 32: 12.8 vs 12.0 ms) and wastes no padding; a GPU needs
# batches to be busy. Part of what fixes the bytes of a token store (recorded in its meta.json).
ENCODE_MICRO_BATCH = {"cpu": 1, "cuda": 32}


def encode_micro_batch(device) -> int:
    return ENCODE_MICRO_BATCH.get(torch.device(device).type, 1)


def to_model(x):
    return x * 2 - 1


def to_image(x):
    return (x + 1) / 2


class Tokenizer(nn.Module):
    """The VQ-VAE tokenizer: encoder E, quantizer Q and decoder D; images to M token maps
    (`encode`) and back (`decode`).

    An image I (and, for the base-detail quantizer, its bases B_1..B_n) is encoded to features
    f = E(I) of side s = S / downsample; the quantizer (`config.quant.kind`: vanilla, multiscale
    or basedetail, quant.py) codes them as token maps r_1..r_M of sides p_1..p_M (its schedule,
    generation order) with one shared codebook of V codes; `decode` sums the maps'
    contributions to f_hat and returns D(f_hat) as an image.

    Parameters
    ----------
    config : TokenizerConfig
        The autoencoder, the quantizer with its schedule, the image side S and the
        decomposition it is for; validated here.

    Attributes
    ----------
    config : TokenizerConfig
    encoder : Encoder
        Images in model space [-1, 1], (B, 3, S, S) -> features (B, Cvae, s, s).
    quantizer : Quantizer
        The schedule (`sizes`, `num_base`, `order`, `stage_ends`, `dim` = Cvae, `latent` = s),
        the codebook and the phi convolutions.
    decoder : Decoder
        Features (B, Cvae, s, s) -> images in model space (B, 3, S, S).
    needs_bases : int
        n, the bases `encode` and `forward` need (base-detail), else 0.

    Examples
    --------
    An untrained base-detail tokenizer on 64 px images (x8: an 8 x 8 latent, 8 base maps of
    sides 1..8, then 3 detail factors x 2 maps of 8 x 8):

    >>> from nextdetail.tokenize.config import config_for
    >>> tok = Tokenizer(config_for("basedetail", image_size=64, downsample=8, ch=32)).eval()
    >>> image = torch.rand(2, 3, 64, 64)                        # float in [0, 1]
    >>> bases = [torch.rand(2, 3, 64, 64) for _ in range(tok.needs_bases)]   # B_1, B_2, B_3
    >>> idx = tok.encode(image, bases)            # 14 int64 maps (2, p_k, p_k), values in [0, V)
    >>> [m.shape[-1] for m in idx]
    [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8, 8]
    >>> tok.decode(idx).shape                     # float32 in [0, 1]
    torch.Size([2, 3, 64, 64])

    A trained one: ``Tokenizer.from_pretrained(path)``, where path is a model folder
    (`nextdetail export-model`, or a Hugging Face repo id), a run folder (its latest
    checkpoint) or a checkpoint file; ``save_pretrained(DIR)`` writes a model folder.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config.validate()
        self.encoder = Encoder(config.model)
        self.decoder = Decoder(config.model)
        self.quantizer = build_quantizer(config.quant, config.model.z_channels, config.latent())

    @property
    def needs_bases(self) -> int:
        """How many bases (B_1..B_n) `encode`/`forward` need: n for base-detail, else 0."""
        return self.config.needs_bases()

    def features(self, image, bases: Optional[Sequence[torch.Tensor]] = None):
        """f_I and [f_B1 .. f_Bn]: one encoder pass over the image and its bases together."""
        n = self.needs_bases
        if n and (bases is None or len(bases) < n):
            raise ValueError(f"the base-detail tokenizer needs bases B_1..B_{n}, got "
                             f"{0 if bases is None else len(bases)}")
        x = torch.cat([image] + list(bases[:n])) if n else image
        size = self.config.image_size
        if tuple(x.shape[-2:]) != (size, size):
            raise ValueError(f"images of {tuple(x.shape[-2:])} pixels: this tokenizer takes {size}x{size}")
        f = self.encode_features(x).chunk(n + 1) if n else (self.encode_features(x),)
        return f[0], list(f[1:])

    def encode_features(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in the tokenizer's space, float (B, 3, H, W) in [0, 1], -> encoder features
        (B, Cvae, H/downsample, W/downsample), unquantized: how an image's f_I or a base's f_Bk is
        made. Any size divisible by the downsample (the encoder is convolutional)."""
        return self.encoder(to_model(x_B3HW))

    def forward(self, image, bases=None) -> TokenizerOut:
        f_I, f_B = self.features(image, bases)
        q = self.quantizer(f_I, f_B)
        return TokenizerOut(self.decoder(q.f_hat), q)

    @torch.no_grad()
    def encode(self, image, bases=None, micro_batch: Optional[int] = None) -> List[torch.Tensor]:
        """Token maps r_1..r_M, generation order: int64 (B, h_k, w_k), values in [0, vocab).

        An image's tokens do not depend on the batch it came in. The encoder runs on
        micro-batches of exactly `micro_batch` images (default `encode_micro_batch(device)`),
        the last one padded by repeating its final image: convolution libraries pick their
        algorithm (and so the order of float sums) by tensor shape, and a barely trained
        codebook has nearest-code distances that differ in the 6th digit, so a shape change
        alone flips tokens. Every image sits alone in its rows of each kernel, and exact
        distance ties go to the lowest code index (argmin). What still changes the bits:
        the torch thread count on the CPU (the export pins it), the device, and the library
        builds; see docs/token-store.md.
        """
        K = int(micro_batch or encode_micro_batch(image.device))
        n, B = self.needs_bases, image.shape[0]
        was = self.training
        self.eval()
        try:
            parts = []
            for a in range(0, B, K):
                xs = [image[a:a + K]] + [b[a:a + K] for b in (bases[:n] if n else [])]
                m = xs[0].shape[0]
                if m < K:                       # pad to the fixed shape; padded rows are dropped
                    xs = [torch.cat([x, x[-1:].expand(K - m, *x.shape[1:])]) for x in xs]
                f_I, f_B = self.features(xs[0], xs[1:])
                parts.append([i[:m] for i in self.quantizer(f_I, f_B).idx])
            if not parts:                       # an empty batch: M empty maps
                return [torch.zeros((0, p, p), dtype=torch.long, device=image.device)
                        for p in self.quantizer.sizes]
            return [torch.cat(maps) for maps in zip(*parts)]
        finally:
            self.train(was)

    def decode_features(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Features -> the decoder's image float32 (B, 3, H, W) in [0, 1], in the tokenizer's
        space (what `encode` takes: unit-log for intrinsic)."""
        return to_image(self.decoder(f_hat_BChw.float())).clamp(0, 1)

    def to_pixels(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """An image in the tokenizer's space -> pixels in [0, 1]: itself, or from_unit_log of a
        log-space (intrinsic) tokenizer's."""
        if self.config.space() == "log":
            from ..decomp.logspace import from_unit_log
            return from_unit_log(x_B3HW).clamp(0, 1)
        return x_B3HW

    @torch.no_grad()
    def decode(self, token_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Algorithm 2: token maps -> image float32 (B, 3, H, W), pixels clamped to [0, 1]."""
        return self.to_pixels(self.decode_features(self.quantizer.lookup(token_maps)))

    @classmethod
    def from_pretrained(cls, path, map_location="cpu", ema: bool = True) -> "Tokenizer":
        """A trained tokenizer, in eval mode: from a model folder (export-model; a Hugging Face
        repo id with huggingface_hub installed), a run folder (its latest checkpoint) or a
        checkpoint file. CheckpointError / ModelFolderError in one line naming what is wrong."""
        from ..pretrained import hub_folder, is_model_folder, load_weights

        path = resolved(hub_folder(path))
        if not is_model_folder(path):
            return cls.from_checkpoint(path, map_location=map_location, ema=ema)
        tok = cls(config_of(path))
        load_weights(path, tok, map_location)
        return tok.eval()

    def save_pretrained(self, out, *, source: Optional[dict] = None, card: Optional[str] = None, **extra) -> Path:
        """This tokenizer as a model folder (nextdetail.pretrained): model.safetensors, config.json
        (the config, its map schedule, `source`: the checkpoint it came from, and `extra`),
        README.md when a `card` is given."""
        from ..pretrained import write_model_folder

        q = self.quantizer
        config = {"config": self.config.to_dict(), "schedule": {"map_sizes": list(q.sizes), "num_base": q.num_base,
                                                                "order": q.order},
                  "source": source or {}, **extra}
        return write_model_folder(out, "tokenizer", self.state_dict(), config, card)

    @classmethod
    def from_checkpoint(cls, path, expect: Optional[TokenizerConfig] = None,
                        map_location="cpu", ema: bool = True) -> "Tokenizer":
        """Rebuild from a training checkpoint, or a run folder's latest (its own config); `expect`
        refuses another config. With `ema` (default) the EMA weights are used when the run kept
        them (--ema)."""
        from ..runs import RunError, latest_checkpoint

        try:
            path = latest_checkpoint(path)
        except RunError as e:
            raise CheckpointError(str(e)) from None
        ckpt, config = read_checkpoint(path, map_location)
        if expect is not None and config != expect:
            raise CheckpointError(f"{path}: checkpoint of another config: "
                                  + "; ".join(config.differences(expect)))
        tok = cls(config)
        tok.load_state_dict(checkpoint_weights(ckpt, ema))
        return tok.eval()


def resolved(path) -> Path:
    """A tokenizer argument as a model folder or checkpoint file (pretrained.resolve_model),
    CheckpointError when it is neither."""
    from ..pretrained import resolve_model
    from ..runs import RunError

    try:
        return resolve_model(path)
    except RunError as e:
        raise CheckpointError(str(e)) from None


def config_of(path) -> TokenizerConfig:
    """The TokenizerConfig of a tokenizer argument (model folder, run folder or checkpoint),
    without building the model; CheckpointError / ModelFolderError when it is not one."""
    from ..pretrained import is_model_folder, read_model_config

    path = resolved(path)
    if not is_model_folder(path):
        return read_checkpoint(path)[1]
    try:
        return TokenizerConfig.from_dict(read_model_config(path, "tokenizer")["config"]).validate()
    except (ConfigError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: bad tokenizer config in its config.json ({e})") from None


def read_checkpoint(path, map_location="cpu"):
    """(checkpoint dict, TokenizerConfig) of a `train-tokenizer` checkpoint; CheckpointError
    (one line naming the file) when it is unreadable or not one."""
    from ..runs import RunError, checkpoint_kind, load_checkpoint

    path = Path(path)
    try:
        ckpt = load_checkpoint(path, map_location, what="nextdetail tokenizer checkpoint")
    except RunError as e:
        raise CheckpointError(str(e)) from None
    kind = checkpoint_kind(ckpt)
    if not kind.startswith("tokenizer") or "model" not in ckpt:
        raise CheckpointError(f"{path}: a {kind}, not a tokenizer run (nextdetail train-tokenizer)")
    try:
        config = TokenizerConfig.from_dict(ckpt["config"]["tokenizer"]).validate()
    except (ConfigError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: bad tokenizer config ({e})") from None
    return ckpt, config


def checkpoint_weights(ckpt: dict, ema: bool = True) -> dict:
    """The model's state dict: the EMA weights when asked for and the run kept them."""
    return ckpt["model_ema"] if ema and "model_ema" in ckpt else ckpt["model"]
