"""Typed configuration of the tokenizer: the autoencoder (`ModelConfig`) and the quantizer
(`QuantConfig`), together a `TokenizerConfig`. Plain dataclasses, saved in every checkpoint as a
dict, so a checkpoint rebuilds its own model and a mismatch is named field by field.

Schedules (token maps in generation order; s = latent side = image side / downsample; the
arithmetic is schedule.py's):

- vanilla     : `depth` maps, all s x s (residual quantization, RQ-VAE).
- multiscale  : one map per entry of `patch_sizes` (VAR next-scale), the last must be s.
- basedetail  : `base_patch_sizes` (multi-scale maps of f_Bn, the last must be s), then for
                each detail factor D_n, ..., D_1, `detail_depth` maps at s x s (CART Algorithm 1):
                M = len(base_patch_sizes) + order * detail_depth.

The tokenizer records the decomposition it is for (`TokenizerConfig.decomposition`, taken from
the training store): it decides how decoded images are shown (intrinsic: unit-log space) and the
defaults of the basedetail schedule, the paper's for each decomposition (SCHEDULES).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import List, Optional, Tuple

from ..errors import ConfigError
from ..options import check_int, derived, flag_of, nested, opt
from ..stores.tokens import MAX_VOCAB
from .schedule import KIND_SCHEDULES, MapSchedule, map_schedule

KINDS = tuple(KIND_SCHEDULES)
_QUANTIZER_NAMES = {"basedetail": "BD quantizer", "multiscale": "multi-scale quantizer",
                    "vanilla": "vanilla quantizer"}


def quantizer_name(kind: str) -> str:
    """How messages name a quantizer: "BD quantizer (--quantizer basedetail)" (after "the" or
    "its"), apart from the base-detail decomposition (decomp.hierarchy.decomposition_name), which
    every quantizer can be trained on."""
    return f"{_QUANTIZER_NAMES.get(kind, kind + ' quantizer')} ({flag_of(QuantConfig, 'kind')} {kind})"

# VAR's and CART-256's schedules on a 16x16 latent (256 px, x16).
VAR_PATCH_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
CART_BASE_PATCH_SIZES = (1, 2, 3, 4, 6, 9, 13, 16)
CART_INTRINSIC_BASE_PATCH_SIZES = (1, 2, 4, 6, 9, 13, 16)

# The CART paper's basedetail schedules per decomposition, (order, detail_depth, base sizes on
# the 16 x 16 reference latent):
#   base_detail  8 base maps + 3 details x 2 = 14      (B_3; D_3, D_2, D_1)
#   specular     8 base maps + 4 terms x 2   = 16      (A_4; E_4, E_3, E_2, E_1)
#   intrinsic    7 shading maps + 1 x 7      = 14      (S; A)
SCHEDULES = {"base_detail": (3, 2, CART_BASE_PATCH_SIZES),
             "specular": (4, 2, CART_BASE_PATCH_SIZES),
             "intrinsic": (1, 7, CART_INTRINSIC_BASE_PATCH_SIZES)}


def scale_patch_sizes(sizes, latent: int, reference: int = 16) -> Tuple[int, ...]:
    """A schedule written for a `reference` latent side scaled to `latent`: strictly increasing,
    ending at `latent`. Keeps the number of maps while latent allows (1, 2, ..., latent at worst),
    e.g. CART's 8 base sizes on an 8x8 latent -> (1, 2, ..., 8)."""
    if len(sizes) >= latent:
        return tuple(range(1, latent + 1))
    n = len(sizes)
    out: List[int] = []
    for i, p in enumerate(sizes):
        lo = out[-1] + 1 if out else 1
        hi = latent - (n - 1 - i)              # leave room for the maps still to come
        out.append(min(max(round(p * latent / reference), lo), hi))
    return tuple(out)


@dataclass(frozen=True)
class ModelConfig:
    """Convolutional encoder/decoder (VQGAN/LDM style). Images are (B, 3, H, W) with H and W
    divisible by `downsample`; latents are (B, z_channels, H/downsample, W/downsample)."""

    downsample: int = opt(16, "encoder stride: log2 of it x2 stages", choices=(8, 16))
    ch: int = opt(128, "channels of the first stage", ge=1)
    ch_mult: Optional[Tuple[int, ...]] = None   # per stage; None: (1, 1, 2, 2, 4, 4)[:stages + 1]
    num_res_blocks: int = opt(2, "residual blocks per stage", ge=1)
    attn: bool = opt(True, "no self-attention at the lowest resolution", flag="--no-attn")
    z_channels: int = 32           # Cvae

    def __post_init__(self):
        for name in ("ch", "num_res_blocks", "z_channels"):
            check_int(name, getattr(self, name))

    def stages(self) -> int:
        if self.downsample not in (2, 4, 8, 16, 32):
            raise ConfigError(f"{flag_of(ModelConfig, 'downsample')} {self.downsample}: must be a power of two "
                              f"in 2..32")
        return self.downsample.bit_length() - 1

    def mults(self) -> Tuple[int, ...]:
        s = self.stages()
        mult = self.ch_mult if self.ch_mult is not None else (1, 1, 2, 2, 4, 4)[: s + 1]
        if len(mult) != s + 1:
            raise ConfigError(f"ch_mult {tuple(mult)}: needs {s + 1} entries for downsample {self.downsample}")
        return tuple(mult)


@dataclass(frozen=True)
class QuantConfig:
    """The quantizer: its kind, the codebook, and the schedule of token maps (the module
    docstring lists the three schedules; schedule.py does their arithmetic).

    The schedule fields left at None are filled in by `schedule(latent, decomposition)`: the
    decomposition's order and detail_depth (SCHEDULES) and the reference sizes scaled to the
    latent side. A `TokenizerConfig` holds the filled-in config, so checkpoints record it.
    The fields' meanings are their option help (`opt`), shown by `nextdetail train-tokenizer
    --help`.

    Parameters
    ----------
    kind : {"vanilla", "multiscale", "basedetail"}
        The quantizer class and its schedule (quant.py, schedule.py).
    vocab : int
        V, the codebook size, one codebook for every map; at most MAX_VOCAB (uint16 tokens).
    beta : float
        The commitment weight of the VQ loss.
    depth : int
        vanilla: M, every map s x s (s: the latent side).
    patch_sizes : tuple of int or None
        multiscale: p_1..p_M, strictly increasing, the last = s.
    base_patch_sizes : tuple of int or None
        basedetail: the sides of the B base maps, strictly increasing, the last = s.
    order : int or None
        basedetail: n, the detail factors (the bases B_1..B_n the quantizer takes).
    detail_depth : int or None
        basedetail: d = (M - B) / n, maps per detail factor, all s x s.
    phi_ratio : float
        r of phi_m(z) = (1 - r) z + r conv3x3(z).
    dead_after, usage_decay : int, float
        A code whose usage (an EMA with this decay) falls below 1 / dead_after is restarted.

    Examples
    --------
    >>> q = QuantConfig(kind="basedetail").schedule(16)      # CART-256 on a 16 x 16 latent
    >>> q.order, q.detail_depth, q.base_patch_sizes
    (3, 2, (1, 2, 3, 4, 6, 9, 13, 16))
    >>> q.map_sizes(16)                                      # M = 8 + 3 x 2
    [1, 2, 3, 4, 6, 9, 13, 16, 16, 16, 16, 16, 16, 16]
    >>> QuantConfig(kind="basedetail").schedule(8, "intrinsic").map_sizes(8)   # 7 + 1 x 7
    [1, 2, 3, 4, 5, 6, 8, 8, 8, 8, 8, 8, 8, 8]
    """

    kind: str = opt("basedetail", "token-map schedule", flag="--quantizer", choices=KINDS)
    vocab: int = opt(4096, "codebook size V, one codebook shared by every token map", ge=2, le=MAX_VOCAB)
    beta: float = opt(0.25, "commitment weight", ge=0)
    depth: int = opt(14, "vanilla: residual depth (maps at full latent resolution)", ge=1)
    # None: the reference schedule (VAR's, CART's) scaled to the latent side; a TokenizerConfig
    # always holds the resolved sizes, so checkpoints record them.
    patch_sizes: Optional[Tuple[int, ...]] = opt(
        None, "multiscale map sides, ending at the latent side (default VAR's, scaled to it)", metavar="P,P,...")
    base_patch_sizes: Optional[Tuple[int, ...]] = opt(
        None, "basedetail base map sides (default CART's 8, scaled to the latent side)", metavar="P,P,...")
    order: Optional[int] = opt(None, "basedetail: detail factors n (default the decomposition's: "
                                     "base_detail 3, specular 4, intrinsic 1)", ge=1)
    detail_depth: Optional[int] = opt(None, "basedetail: maps per detail factor, (M - B) / n (default 2; "
                                            "intrinsic 7)", ge=1)
    phi_ratio: float = 0.5         # phi_k(z) = (1 - r) z + r conv3x3(z), as VAR's quant_resi
    dead_after: int = opt(200, "steps unused before a code is re-initialised", ge=1)
    usage_decay: float = 0.99

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"{flag_of(QuantConfig, 'kind')} {self.kind!r}: one of {', '.join(KINDS)}")
        for name in ("vocab", "depth", "order", "detail_depth"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{flag_of(QuantConfig, name)} {getattr(self, name)}: must be >= 1")
        if self.vocab > MAX_VOCAB:      # export-tokens stores token ids as uint16
            raise ConfigError(f"--vocab {self.vocab}: a token store holds uint16 ids, at most {MAX_VOCAB} codes")
        for name in ("patch_sizes", "base_patch_sizes"):
            if getattr(self, name) is None:
                continue
            sizes = tuple(getattr(self, name))
            object.__setattr__(self, name, sizes)
            if not sizes or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
                raise ConfigError(f"{flag_of(QuantConfig, name)} {','.join(map(str, sizes))}: must be strictly "
                                  f"increasing positive sizes")

    def schedule(self, latent: int, decomposition: str = "base_detail") -> "QuantConfig":
        """This config with what is left at None filled in: the decomposition's schedule
        (SCHEDULES) and the default sizes scaled to a latent of side `latent`."""
        if decomposition not in SCHEDULES:
            raise ConfigError(f"no tokenizer schedule for the decomposition {decomposition!r}; "
                              f"known: {', '.join(SCHEDULES)}")
        order, depth, base = SCHEDULES[decomposition]
        return replace(self, order=self.order or order, detail_depth=self.detail_depth or depth,
                       patch_sizes=self.patch_sizes or scale_patch_sizes(VAR_PATCH_SIZES, latent),
                       base_patch_sizes=self.base_patch_sizes or scale_patch_sizes(base, latent))

    def num_maps(self) -> int:
        """M; with default schedules (base_detail's), at the reference 16 x 16 latent."""
        return len(map_schedule(self.schedule(16), 16, check=False).sizes)

    def map_sizes(self, latent: int) -> List[int]:
        """Side of each token map, in generation order, for a latent of side `latent`."""
        return list(map_schedule(self.schedule(latent), latent).sizes)


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything that builds a `Tokenizer`: the autoencoder, the quantizer, the image side and
    the decomposition. Saved in every checkpoint (`to_dict`), read back with `from_dict`.

    On construction the quantizer's schedule is filled in for this latent side and this
    decomposition (`QuantConfig.schedule`), so `quant` always holds explicit sizes.

    Parameters
    ----------
    model : ModelConfig
        The convolutional encoder and decoder: downsample, widths, z_channels (Cvae).
    quant : QuantConfig
        The quantizer; its None fields are filled in here.
    image_size : int
        S, the side of the square images (training crops) it takes; divisible by
        model.downsample.
    decomposition : str
        The decomposition of the training store (a method of nextdetail.decomp): the default
        basedetail schedule (SCHEDULES) and the space of its images (`space`).

    Attributes
    ----------
    quant : QuantConfig
        With the schedule filled in.

    Examples
    --------
    >>> cfg = TokenizerConfig(model=ModelConfig(downsample=8), image_size=64)
    >>> cfg.latent(), cfg.quant.base_patch_sizes       # s = S / downsample; CART's sizes scaled
    (8, (1, 2, 3, 4, 5, 6, 7, 8))
    >>> cfg.map_schedule().stage_ends, cfg.needs_bases()
    ([8, 10, 12, 14], 3)
    >>> TokenizerConfig.from_dict(cfg.to_dict()) == cfg     # as a checkpoint stores it
    True
    """

    model: ModelConfig = nested(ModelConfig)
    quant: QuantConfig = nested(QuantConfig)
    image_size: int = opt(256, "training crop side (random crops of the store's images)", metavar="S", ge=1)
    decomposition: str = derived("base_detail", "the decomposition of the training store (its meta.json)")

    def __post_init__(self):
        check_int("image_size", self.image_size)
        # The decomposition's schedule, default sizes scaled to this latent side, held
        # explicitly (saved in checkpoints).
        object.__setattr__(self, "quant", self.quant.schedule(self.latent(), self.decomposition))

    def space(self) -> str:
        """What the tokenizer's images are: "linear" (pixels) or "log" (unit-log, intrinsic):
        `to_pixels` takes its decoded images back to pixels."""
        from ..decomp import method_info
        return method_info(self.decomposition).space

    def latent(self) -> int:
        if self.image_size % self.model.downsample:
            raise ConfigError(f"{flag_of(TokenizerConfig, 'image_size')} {self.image_size} is not divisible by "
                              f"{flag_of(ModelConfig, 'downsample')} {self.model.downsample}")
        return self.image_size // self.model.downsample

    def map_schedule(self) -> MapSchedule:
        """The quantizer's schedule (schedule.py) on this latent, from the config alone."""
        return map_schedule(self.quant, self.latent())

    def needs_bases(self) -> int:
        """How many bases B_1..B_n the quantizer uses: n for the BD quantizer, else 0."""
        return map_schedule(self.quant, self.latent(), check=False).order

    def validate(self) -> "TokenizerConfig":
        self.model.mults()
        self.quant.map_sizes(self.latent())
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        def build(klass, values):
            known = {f.name for f in fields(klass)}
            unknown = set(values) - known
            if unknown:
                raise ConfigError(f"unknown {klass.__name__} fields: {', '.join(sorted(unknown))}")
            return klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        return cls(model=build(ModelConfig, d.get("model", {})), quant=build(QuantConfig, d.get("quant", {})),
                   image_size=int(d.get("image_size", 256)),
                   decomposition=str(d.get("decomposition", "base_detail")))     # older checkpoints: base_detail

    def differences(self, other: "TokenizerConfig") -> List[str]:
        """'--quantizer basedetail (checkpoint) != vanilla (asked)' for each field that differs."""
        from ..runs import checkpoint_differences

        return checkpoint_differences(self, other)


def config_for(kind: str = "basedetail", image_size: int = 256, downsample: int = 16, *, ch: int = 128,
               num_res_blocks: int = 2, attn: bool = True, decomposition: str = "base_detail",
               **quant) -> TokenizerConfig:
    """A validated config whose default schedules (the decomposition's) are scaled to the latent
    side (identity at 256 px, x16). E.g. 64x64 crops with x8 -> 8x8 latent: base maps and VAR
    sizes 1..8, CART's M = 8 + 3 * 2 = 14. Explicit `patch_sizes` / `base_patch_sizes` are kept."""
    return TokenizerConfig(model=ModelConfig(downsample=downsample, ch=ch, num_res_blocks=num_res_blocks,
                                             attn=attn),
                           quant=QuantConfig(kind=kind, **quant), image_size=image_size,
                           decomposition=decomposition).validate()
