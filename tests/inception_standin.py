"""A stand-in for the Inception-v3 weights file (the real one cannot be downloaded here): the
same network and file format as torch-fidelity's weights-inception-2015-12-05-6726825d.pth,
randomly initialised (seeded), with its BatchNorm statistics set from a few given images so that
activations keep their scale through the 94 layers (with PyTorch's default initialisation they
shrink to ~0, or blow up, and every distance becomes meaningless). Random features still see
blur, noise and content: enough to test the pipeline, not to give comparable numbers."""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import torch


def write_standin_inception(path: Path, images_NHW3: np.ndarray, seed: int = 0) -> Path:
    import torch_fidelity.feature_extractor_inceptionv3 as m

    torch.manual_seed(seed)
    # Build the network without loading anything (no download, no file).
    with mock.patch.object(m, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(m.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = m.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for bn in net.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None              # a plain average over the calibration batch
            bn.train()
    with torch.no_grad():
        net(torch.from_numpy(np.ascontiguousarray(images_NHW3)).permute(0, 3, 1, 2))
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
