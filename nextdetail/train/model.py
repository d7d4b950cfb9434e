"""The next-detail transformer: a decoder-only (GPT-2 / VAR style) model over token maps.

Token maps r_1..r_M (shapes `map_shapes`, generation order: base maps, then detail maps) are
flattened into one sequence of L = sum h_k w_k tokens. Step k predicts all h_k w_k tokens of
map k at once from

- step 1: the start token, a class embedding (index `num_classes` is the null class of
  classifier-free guidance), repeated over the h_1 w_1 positions of map 1 (1 x 1 normally);
- step k > 1: the continuous VAR/CART input (cumulative f_hat after maps < k at map k's size,
  `inputs.py`), projected from Cvae to the model width;

plus a level (map index) embedding. Attention is block-causal: a token of map k attends to every
token of maps 1..k (`block_causal_mask`). Positions are normalized 2-D RoPE (STAR): the token
(i, j) of an h x w map sits at ((i + 0.5) / h * G, (j + 0.5) / w * G), G = `rope_grid`, so a
token and the finer tokens it covers share a centre and a map of a size never seen in training
needs no new parameters. `pos="learned"` adds learned absolute embeddings per map instead.
`adaln=True` conditions every block on the class through adaptive LayerNorm (DiT's
shift/scale/gate, zero-initialised); otherwise the class enters only through the start token.

    model = NextDetailTransformer(TransformerConfig(vocab=V, map_shapes=((1, 1), (2, 2)), cvae=32))
    logits_BLV = model(labels_B, f_BLc)          # f: inputs of maps 2..M, (B, L - h_1 w_1, Cvae)
    cache = model.new_cache()
    logits_BlV = model.step(0, labels_B, None, cache)      # map 1; then step(k, labels, f_Blc, cache)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..options import flag_of, opt


@dataclass(frozen=True)
class TransformerShape:
    """The transformer's architecture: what a user chooses (the options of `nextdetail train`)."""

    depth: int = opt(6, "transformer blocks", ge=1)
    width: int = opt(384, "model width", ge=1)
    heads: int = opt(6, "attention heads", ge=1)
    mlp_ratio: float = opt(4.0, "MLP width / model width", gt=0)
    pos: str = opt("rope", "normalized 2-D RoPE or learned absolute positions", choices=("rope", "learned"))
    rope_grid: float = 0.0                      # G of the normalized positions; 0: the largest map side
    rope_base: float = 100.0
    adaln: bool = opt(False, "condition every block on the class by AdaLN")
    init_std: float = 0.02

    def __post_init__(self):
        flag = lambda name: flag_of(TransformerShape, name)      # noqa: E731
        for name in ("depth", "width", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} {getattr(self, name)}: must be >= 1")
        if self.width % self.heads:
            raise ConfigError(f"{flag('width')} {self.width} is not divisible by {flag('heads')} {self.heads}")
        if self.pos not in ("rope", "learned"):
            raise ConfigError(f"{flag('pos')} {self.pos!r}: 'rope' or 'learned'")
        if self.pos == "rope" and (self.width // self.heads) % 4:
            raise ConfigError(f"{flag('width')} / {flag('heads')} = {self.width // self.heads}, the head dim: 2-D "
                              f"RoPE needs a multiple of 4")


@dataclass(frozen=True, kw_only=True)
class TransformerConfig(TransformerShape):
    """The shape and what the data fixes: the vocabulary, the token maps, the tokenizer's
    latent channels and the classes. Saved flat in every checkpoint ("model_config")."""

    vocab: int                                  # V, the tokenizer's codebook size
    map_shapes: Tuple[Tuple[int, int], ...]     # (h_k, w_k), generation order
    cvae: int                                   # channels of the continuous inputs (tokenizer latent)
    num_classes: int = 0                        # class labels 0..C-1; C is the null class

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "map_shapes", tuple((int(h), int(w)) for h, w in self.map_shapes))
        if not self.map_shapes or any(h < 1 or w < 1 for h, w in self.map_shapes):
            raise ConfigError(f"map_shapes {self.map_shapes}: need at least one map of positive size")
        for name in ("vocab", "cvae"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)}: must be >= 1")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes {self.num_classes}: must be >= 0")

    @property
    def seq_len(self) -> int:
        return sum(h * w for h, w in self.map_shapes)

    def offsets(self) -> List[int]:
        out = [0]
        for h, w in self.map_shapes:
            out.append(out[-1] + h * w)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        return cls(**{**d, "map_shapes": tuple(tuple(s) for s in d["map_shapes"])})


def block_causal_mask(map_shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """bool (L, L): True where query token q may attend to key token k, i.e. level(k) <= level(q)."""
    level_L = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(map_shapes)])
    return level_L[:, None] >= level_L[None, :]


def normalized_positions(h: int, w: int, grid: float) -> torch.Tensor:
    """(h w, 2) float: token centres of an h x w map scaled to a grid x grid square (STAR)."""
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h * grid
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w * grid
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def rope_angles(pos_l2: torch.Tensor, head_dim: int, base: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (l, head_dim / 2): the first half of the pairs rotate with y, the second with x."""
    n = head_dim // 4
    freq_n = base ** (-torch.arange(n, dtype=torch.float64) / n)
    ang = torch.cat([pos_l2[:, :1] * freq_n, pos_l2[:, 1:] * freq_n], 1)      # (l, head_dim / 2)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x_BHlD: torch.Tensor, cos_lP: torch.Tensor, sin_lP: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2p], x[2p+1]) of every head by the angles (l, D / 2)."""
    x1, x2 = x_BHlD.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos_lP - x2 * sin_lP, x1 * sin_lP + x2 * cos_lP], -1).flatten(-2)
    return out.type_as(x_BHlD)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x_BlC, rope, mask_lL: Optional[torch.Tensor], cache: Optional[list]):
        """cache: None (full sequence) or a [k, v] list this call appends its keys/values to."""
        B, l, C = x_BlC.shape
        q, k, v = self.qkv(x_BlC).view(B, l, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_lL)
        return self.proj(y.transpose(1, 2).reshape(B, l, C))


class Block(nn.Module):
    """Pre-LN transformer block; with AdaLN, (shift, scale, gate) x 2 come from the class."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, elementwise_affine=not cfg.adaln)
        self.ln2 = nn.LayerNorm(cfg.width, elementwise_affine=not cfg.adaln)
        self.attn = Attention(cfg)
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, cfg.width))
        self.ada = nn.Linear(cfg.width, 6 * cfg.width) if cfg.adaln else None

    def forward(self, x_BlC, cond_BC, rope, mask_lL, cache=None):
        if self.ada is None:
            x_BlC = x_BlC + self.attn(self.ln1(x_BlC), rope, mask_lL, cache)
            return x_BlC + self.mlp(self.ln2(x_BlC))
        s1, c1, g1, s2, c2, g2 = self.ada(F.silu(cond_BC))[:, None].chunk(6, -1)
        x_BlC = x_BlC + g1 * self.attn(self.ln1(x_BlC) * (1 + c1) + s1, rope, mask_lL, cache)
        return x_BlC + g2 * self.mlp(self.ln2(x_BlC) * (1 + c2) + s2)


class NextDetailTransformer(nn.Module):
    """The next-detail transformer: logits of every token of map k from the class and the
    maps before it (the module docstring has the inputs, the mask and the positions).

    A sequence is the M token maps flattened, L = sum_k h_k w_k tokens; position t of map k
    predicts token t, all h_k w_k of a map at once. `forward` runs the whole sequence (teacher
    forcing, training); `new_cache` and `step` run it map by map with a key/value cache
    (generation, nextdetail.generate.loop).

    Parameters
    ----------
    cfg : TransformerConfig
        The shape (depth, width, heads, positions, AdaLN) and what the data fixes: vocab V,
        map_shapes ((h_k, w_k), generation order), cvae (channels of the continuous inputs)
        and num_classes C.

    Attributes
    ----------
    cfg : TransformerConfig
    class_emb : nn.Embedding, (C + 1, width)
        The start token of each class; row C is the null class (no label, guidance).
    input_proj : nn.Linear, cvae -> width
        Projects map k's continuous input (k > 1).
    level_emb : nn.Embedding, (M, width)
        Which map a token belongs to.
    blocks : nn.ModuleList of `Block`, depth of them
    head : nn.Linear, width -> V
    offsets : list of int, (M + 1,)
        Where each map starts in the sequence; offsets[-1] = L.
    mask_LL : bool tensor (L, L)
        The block-causal mask (`block_causal_mask`).

    Examples
    --------
    Three maps (1 x 1, 2 x 2, 4 x 4: L = 21), 10 classes:

    >>> cfg = TransformerConfig(vocab=16, map_shapes=((1, 1), (2, 2), (4, 4)), cvae=8,
    ...                         depth=2, width=64, heads=2, num_classes=10)
    >>> model = NextDetailTransformer(cfg).eval()
    >>> labels = torch.tensor([3, -1])             # -1: the null class (unconditional)
    >>> f = torch.randn(2, 4 + 16, 8)              # the inputs of maps 2..M (train.inputs)
    >>> model(labels, f).shape                     # logits (B, L, V)
    torch.Size([2, 21, 16])
    >>> cache = model.new_cache()
    >>> model.step(0, labels, None, cache).shape   # map 1, from the start token
    torch.Size([2, 1, 16])
    >>> model.step(1, labels, f[:, :4], cache).shape   # map 2, from its input and the cache
    torch.Size([2, 4, 16])
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        C, M = cfg.width, len(cfg.map_shapes)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)        # last row: the null class
        self.input_proj = nn.Linear(cfg.cvae, C)
        self.level_emb = nn.Embedding(M, C)
        self.offsets = cfg.offsets()
        if cfg.pos == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(1, cfg.seq_len, C))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width, elementwise_affine=not cfg.adaln)
        self.ada_f = nn.Linear(C, 2 * C) if cfg.adaln else None
        self.head = nn.Linear(C, cfg.vocab)
        level_L = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(cfg.map_shapes)])
        self.register_buffer("level_L", level_L, persistent=False)
        self.register_buffer("mask_LL", block_causal_mask(cfg.map_shapes), persistent=False)
        self._rope_cache = {}
        self._init()

    def _init(self):
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        if self.cfg.pos == "learned":
            nn.init.trunc_normal_(self.pos_emb, std=std)
        for b in self.blocks:       # GPT-2: residual projections scaled by depth
            nn.init.trunc_normal_(b.attn.proj.weight, std=std / math.sqrt(2 * self.cfg.depth))
            nn.init.trunc_normal_(b.mlp[2].weight, std=std / math.sqrt(2 * self.cfg.depth))
            if b.ada is not None:
                nn.init.zeros_(b.ada.weight)
        if self.ada_f is not None:
            nn.init.zeros_(self.ada_f.weight)

    # ------------------------------------------------------------------ helpers

    @classmethod
    def from_pretrained(cls, path, map_location="cpu") -> "NextDetailTransformer":
        """A transformer model folder (export-model; a Hugging Face repo id with huggingface_hub
        installed), in eval mode, its weights verified against its config.json (ModelFolderError)."""
        from ..pretrained import hub_folder, load_weights, read_model_config

        path = hub_folder(path)
        model = cls(TransformerConfig.from_dict(read_model_config(path, "transformer")["config"]))
        load_weights(path, model, map_location)
        return model.to(map_location).eval()

    def save_pretrained(self, out, *, source: Optional[dict] = None, card: Optional[str] = None, **extra):
        """This transformer as a model folder (nextdetail.pretrained): its weights, config.json (the
        config, `source`: the checkpoint they came from, and `extra`: tokenizer, classes)."""
        from ..pretrained import write_model_folder

        return write_model_folder(out, "transformer", self.state_dict(),
                                  {"config": self.cfg.to_dict(), "source": source or {}, **extra}, card)

    def null_class(self) -> int:
        return self.cfg.num_classes

    def class_index(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Labels -> rows of class_emb: -1 (no label) and out-of-range become the null class."""
        null = self.cfg.num_classes
        return torch.where((labels_B >= 0) & (labels_B < null), labels_B, torch.full_like(labels_B, null))

    def rope(self, shapes: Sequence[Tuple[int, int]], device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """cos, sin (l, head_dim / 2) for the tokens of the given maps, concatenated."""
        if self.cfg.pos != "rope":
            return None
        key = (tuple(shapes), str(device))
        if key not in self._rope_cache:
            grid = self.cfg.rope_grid or max(max(s) for s in self.cfg.map_shapes)
            pos = torch.cat([normalized_positions(h, w, grid) for h, w in shapes])
            cos, sin = rope_angles(pos, self.cfg.width // self.cfg.heads, self.cfg.rope_base)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def embed(self, k0: int, k1: int, labels_B, f_Blc: Optional[torch.Tensor]) -> torch.Tensor:
        """Token embeddings of maps k0..k1-1 (k0 = 0: the start tokens come first)."""
        parts = []
        if k0 == 0:
            h, w = self.cfg.map_shapes[0]
            sos = self.class_emb(self.class_index(labels_B))[:, None]
            parts.append(sos.expand(-1, h * w, -1))
        if k1 > max(k0, 1):
            if f_Blc is None:
                raise ValueError(f"maps {max(k0, 1)}..{k1 - 1} need their continuous inputs")
            parts.append(self.input_proj(f_Blc))
        x_BlC = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        lo, hi = self.offsets[k0], self.offsets[k1]
        x_BlC = x_BlC + self.level_emb(self.level_L[lo:hi])
        if self.cfg.pos == "learned":
            x_BlC = x_BlC + self.pos_emb[:, lo:hi]
        return x_BlC

    def out(self, x_BlC, cond_BC):
        x_BlC = self.ln_f(x_BlC)
        if self.ada_f is not None:
            shift, scale = self.ada_f(F.silu(cond_BC))[:, None].chunk(2, -1)
            x_BlC = x_BlC * (1 + scale) + shift
        return self.head(x_BlC)

    # ------------------------------------------------------------------ training

    def forward(self, labels_B: torch.Tensor, f_BLc: Optional[torch.Tensor]) -> torch.Tensor:
        """Teacher forcing over every map. labels_B: int64 (B,) (-1 or num_classes: null);
        f_BLc: (B, L - h_1 w_1, Cvae), the inputs of maps 2..M (None when M = 1).
        Returns logits_BLV (B, L, V): position t predicts token t."""
        M = len(self.cfg.map_shapes)
        x_BLC = self.embed(0, M, labels_B, f_BLc)
        cond_BC = self.class_emb(self.class_index(labels_B))
        rope = self.rope(self.cfg.map_shapes, x_BLC.device)
        for b in self.blocks:
            x_BLC = b(x_BLC, cond_BC, rope, self.mask_LL)
        return self.out(x_BLC, cond_BC)

    # ------------------------------------------------------------------ sampling

    def new_cache(self) -> List[list]:
        """One empty [k, v] per block; `step` fills them map by map."""
        return [[] for _ in self.blocks]

    def step(self, k: int, labels_B, f_Blc: Optional[torch.Tensor], cache: List[list]) -> torch.Tensor:
        """Logits (B, h_k w_k, V) of map k given the cache of maps < k (which this call extends).
        k = 0 uses the start tokens; otherwise f_Blc (B, h_k w_k, Cvae) is map k's input."""
        cond_BC = self.class_emb(self.class_index(labels_B))
        x_BlC = self.embed(k, k + 1, labels_B, f_Blc)
        rope = self.rope([self.cfg.map_shapes[k]], x_BlC.device)
        for b, c in zip(self.blocks, cache):
            x_BlC = b(x_BlC, cond_BC, rope, None, c)    # keys so far: maps <= k, all visible
        return self.out(x_BlC, cond_BC)
