"""Loss modules of the tokenizer's compound loss: LPIPS (offline) and a PatchGAN discriminator
with hinge losses.

LPIPS = an ImageNet backbone + linear heads. The `lpips` package ships the heads; the backbone
is torchvision's, which it would download through torchvision on its own terms. We build it
random (pnet_rand=True) and load torchvision's weights ourselves, found or downloaded the way
nextdetail.weights says (the hub cache, a download unless offline, else one line), or keep it
random when asked (offline tests, with a warning).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import Weights, WeightsError, weights_file

log = logging.getLogger(__name__)

# torchvision's files for the backbones LPIPS uses (what torchvision would download).
BACKBONES = {net: Weights(f"LPIPS {net} backbone (torchvision's ImageNet weights)",
                          f"https://download.pytorch.org/models/{name}")
             for net, name in (("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth"),
                               ("squeeze", "squeezenet1_1-b8a52dc0.pth"))}
BACKBONE_FILES = {net: w.filename for net, w in BACKBONES.items()}
LPIPSWeightsError = WeightsError


def backbone_path(net: str) -> Path:
    """Where the hub cache keeps the backbone's file."""
    return BACKBONES[net].cached()


def build_lpips(net: str = "alex", backbone: str = "pretrained", *, no_download: bool = False,
                without: str = "") -> nn.Module:
    """A frozen LPIPS module taking images in [-1, 1]; returns (B, 1, 1, 1) distances.

    backbone: "pretrained" loads torchvision's weights (the hub cache, else downloaded there
    unless no_download / NEXTDETAIL_OFFLINE; WeightsError naming the file and `without`, the
    caller's option that does without them, otherwise); "random"
    keeps a randomly initialised backbone (seeded, so every run gets the same one) and warns:
    the loss is then only a fixed random-feature distance.
    """
    import lpips

    if net not in BACKBONES:
        raise ValueError(f"LPIPS net {net!r}: one of {', '.join(BACKBONES)}")
    if backbone not in ("pretrained", "random"):
        raise ValueError(f"LPIPS backbone {backbone!r}: 'pretrained' or 'random'")
    if backbone == "pretrained":
        path = weights_file(BACKBONES[net], no_download=no_download, without=without)
    # A private RNG stream: building the random backbone must not shift the training RNG.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # lpips calls torchvision with the deprecated `pretrained=False`: noise, not a problem.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        torch.manual_seed(0)
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if backbone == "pretrained":
        from ..runs import RunError, load_checkpoint

        try:
            state = load_checkpoint(path, what="torchvision state dict")
        except RunError as e:
            raise LPIPSWeightsError(f"LPIPS backbone weights: {e}") from None
        # lpips keeps torchvision's `features.<i>` layers as `slice<j>.<i>`.
        own = model.net.state_dict()
        mapped = {name: state["features." + name.split(".", 1)[1]] for name in own}
        model.net.load_state_dict(mapped)
        log.info("LPIPS: %s backbone loaded from %s", net, path)
    else:
        log.warning("LPIPS with a RANDOM %s backbone: perceptual loss values are not meaningful", net)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming's NLayerDiscriminator): a logit per overlapping patch.
    GroupNorm instead of BatchNorm so the logits do not depend on the batch's composition."""

    def __init__(self, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, n_layers + 1):
            c_out = ch * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, c_out // 4), c_out),
                       nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x_B3HW):
        return self.net(x_B3HW)


def hinge_d_loss(real_logits, fake_logits):
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits):
    return -fake_logits.mean()
