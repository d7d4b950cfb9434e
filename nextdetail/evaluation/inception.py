"""Inception-v3 features for FID, IS, KID and precision/recall.

The network is torch-fidelity's port of the TensorFlow Inception graph of 2015-12-05, the graph
OpenAI's ADM evaluator (and so VAR, LlamaGen, RAR, CART) computes its numbers with: the same
weights, TF's bilinear resize to 299 x 299 and (x - 128) / 128 input scaling, pool features of
2048 and the 1008 logits ("logits_unbiased", as IS uses them). torch-fidelity is maintained, pure
PyTorch and reproduces the TF numbers to within a small fraction of a FID point (its README;
clean-fid instead changes the resize, which moves FID by whole points at times, LlamaGen #34).

The weights file is read here with runs.load_checkpoint (torch.load(weights_only=True): a pickle
that needs code is refused, never run) and handed to torch-fidelity's constructor in place of its
own download, so its own file loader is never called.
"""
from __future__ import annotations

import logging
from typing import Iterable, Tuple

import numpy as np
import torch

from ..errors import first_line
from ..weights import Weights, WeightsError

log = logging.getLogger(__name__)

INCEPTION = Weights("Inception-v3 weights (FID/IS/KID; torch-fidelity's port of the TF graph ADM uses)",
                    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                    "weights-inception-2015-12-05-6726825d.pth")
POOL, LOGITS = "2048", "logits_unbiased"


def load_inception(path, device="cpu") -> torch.nn.Module:
    """The feature extractor with the weights file at `path` (a state dict in torch-fidelity's
    format); WeightsError naming the file when it is not one."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from ..runs import RunError, load_checkpoint

    try:
        state = load_checkpoint(path, what=INCEPTION.what)
        # The constructor fetches its weights with load_state_dict_from_url when given no path:
        # it gets the state dict just read instead, so no other loader ever opens the file.
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state):
            net = fe.FeatureExtractorInceptionV3("inception-v3-compat", [POOL, LOGITS])
    except (RunError, RuntimeError, KeyError) as e:      # refused or damaged file, wrong keys or shapes
        first = first_line(e).removeprefix(f"{path}: ")
        raise WeightsError(f"{path}: not usable as the {INCEPTION.what} ({type(e).__name__}: {first[:200]})") from None
    return net.to(device).eval()


@torch.no_grad()
def inception_features(net, batches: Iterable[np.ndarray], device="cpu", progress=None
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 image batches (b, H, W, 3) -> pool features float64 (N, 2048) and logits float64
    (N, 1008). The network resizes every batch to 299 x 299 itself."""
    pools, logits = [], []
    for x_bHW3 in batches:
        x_b3HW = torch.from_numpy(np.require(x_bHW3, np.uint8, ["C", "W"])).permute(0, 3, 1, 2).to(device)
        pool, logit = net(x_b3HW)
        pools.append(pool.double().cpu().numpy())
        logits.append(logit.double().cpu().numpy())
        if progress is not None:
            progress(len(x_bHW3))
    if not pools:
        return np.zeros((0, 2048)), np.zeros((0, 1008))
    return np.concatenate(pools), np.concatenate(logits)
