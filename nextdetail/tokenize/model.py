"""Convolutional encoder and decoder in the VQGAN / LDM style: residual blocks, x2 down/up
stages, optional self-attention at the lowest resolution.

    Encoder: x_B3HW (values in [-1, 1]) -> f_BChw, C = z_channels, h = H / downsample
    Decoder: f_BChw -> x_B3HW (unbounded; ~[-1, 1] once trained)
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def norm(ch: int) -> nn.GroupNorm:
    # 32 groups as in LDM, fewer for the tiny test models whose widths are not multiples of 32.
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (only used at the lowest resolution,
    where there are few: 16x16 at 256 px)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x_BChw):
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, h * w).transpose(-1, -2).unbind(1)
        y_BlC = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x_BChw + self.proj(y_BlC.transpose(1, 2).reshape(B, C, h, w))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        mult = cfg.mults()
        chs = [cfg.ch * m for m in mult]
        layers = [nn.Conv2d(3, chs[0], 3, padding=1)]
        cin = chs[0]
        for i, c in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, c))
                cin = c
            if i < len(chs) - 1:                      # x2 down between stages
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers.append(ResBlock(cin, cin))
        if cfg.attn:
            layers.append(AttnBlock(cin))
        layers += [ResBlock(cin, cin), norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.z_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x_B3HW):
        return self.net(x_B3HW)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.mults()][::-1]
        cin = chs[0]
        layers = [nn.Conv2d(cfg.z_channels, cin, 3, padding=1), ResBlock(cin, cin)]
        if cfg.attn:
            layers.append(AttnBlock(cin))
        layers.append(ResBlock(cin, cin))
        for i, c in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, c))
                cin = c
            if i < len(chs) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [norm(cin), nn.SiLU(), nn.Conv2d(cin, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f_BChw):
        return self.net(f_BChw)
