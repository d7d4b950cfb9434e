"""A StyleGAN2-style residual discriminator: the one the CART and STAR papers name for their
tokenizers (`--disc stylegan`; the PatchGAN of losses.py stays the default).

    logit_B1 = StyleGANDiscriminator(ch=64, image_size=256)(x_B3HW)     # x in [-1, 1]

Architecture (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN",
config E/F's residual D), without the equalized learning rate and the FIR blur of the original:

    fromRGB: 1x1 conv, lrelu(0.2)                                  (B, ch, S, S)
    per block, S -> S/2 until 4x4:
        main = conv3x3 lrelu -> avgpool 2 -> conv3x3 lrelu           channels c -> min(2c, 8 ch)
        skip = avgpool 2 -> 1x1 conv (no bias)
        out  = (main + skip) / sqrt(2)                              keeps the variance
    epilogue at 4x4: minibatch standard deviation (groups of `mbstd_group` images; one more
    feature map: the mean over features and pixels of the std over the group), conv3x3 lrelu,
    flatten, fc lrelu, fc -> one logit per image.

The minibatch-std feature lets D see the spread of a batch, which penalises a generator that
collapses to few outputs. Its groups are taken inside a process's batch, so under DDP a
process's batch must be a multiple of the group (the last group is otherwise smaller).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _lrelu(x):
    return F.leaky_relu(x, 0.2)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        h = _lrelu(self.conv1(x))
        h = _lrelu(self.conv2(F.avg_pool2d(h, 2)))
        return (h + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


def minibatch_std(x_BChw: torch.Tensor, group: int) -> torch.Tensor:
    """x with one more channel: per group of `group` consecutive images (fewer for a last,
    smaller group), the std over the group of each feature and pixel, averaged to one value."""
    B, C, h, w = x_BChw.shape
    out = []
    for lo in range(0, B, group):
        g = x_BChw[lo:lo + group].float()
        std = (g.var(0, unbiased=False) + 1e-8).sqrt().mean() if len(g) > 1 else g.new_zeros(())
        out.append(std.reshape(1, 1, 1, 1).expand(len(g), 1, h, w))
    return torch.cat([x_BChw, torch.cat(out).to(x_BChw.dtype)], dim=1)


class StyleGANDiscriminator(nn.Module):
    def __init__(self, ch: int = 64, image_size: int = 256, mbstd_group: int = 4):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"a StyleGAN discriminator needs images of at least 8 px, got {image_size}")
        self.mbstd_group = mbstd_group
        self.from_rgb = nn.Conv2d(3, ch, 1)
        blocks, c, side = [], ch, image_size
        while side > 4:
            c_out = min(2 * c, 8 * ch)
            blocks.append(ResBlock(c, c_out))
            c, side = c_out, side // 2
        self.blocks = nn.Sequential(*blocks)
        self.conv = nn.Conv2d(c + 1, c, 3, padding=1)
        self.fc = nn.Linear(c * 16, c)
        self.out = nn.Linear(c, 1)

    def forward(self, x_B3HW):
        h = self.blocks(_lrelu(self.from_rgb(x_B3HW)))
        if h.shape[-1] != 4:              # sides that are not a power of 2 end near 4x4
            h = F.adaptive_avg_pool2d(h, 4)
        h = _lrelu(self.conv(minibatch_std(h, self.mbstd_group)))
        return self.out(_lrelu(self.fc(h.flatten(1))))


def r1_penalty(real_logits: torch.Tensor, real_B3HW: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E ||grad_x D(x)||^2 over the real images, the gradient penalty
    StyleGAN trains with; the caller scales it by gamma / 2. real_B3HW must require grad and
    real_logits = D(real_B3HW); returned with its graph, so its gradient reaches D's weights
    (double backward)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_B3HW, create_graph=True)
    return grad.float().pow(2).sum(dim=(1, 2, 3)).mean()
