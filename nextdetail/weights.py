"""Pretrained weights that metrics and losses need (Inception-v3 for FID/IS/KID, LPIPS's ImageNet
backbone), found the way users of torch expect:

    1. the file given (--inception-weights FILE): used as is, an error if it is not there;
    2. the torch hub cache, TORCH_HOME/hub/checkpoints/<file> (where torch.hub and torchvision
       put what they download, so a file fetched once by any of them is found);
    3. a download into that cache (torch.hub.download_url_to_file, checked against the sha256
       prefix in the file's name), unless offline: `--offline`, or NEXTDETAIL_OFFLINE=1;
    4. else one line naming the file, where it comes from, where to put it and the option that
       does without it (exit status 2).

Files are read with torch.load(weights_only=True) (runs.load_checkpoint): a pickle that needs
anything but tensors is refused, never executed.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import NextDetailError, first_line

log = logging.getLogger(__name__)

OFFLINE_ENV = "NEXTDETAIL_OFFLINE"


class WeightsError(NextDetailError, FileNotFoundError):
    """Pretrained weights that cannot be found or fetched; one line: which file, from where, to where."""


@dataclass(frozen=True)
class Weights:
    """A published weights file: what it is, where it comes from, its name in the hub cache."""

    what: str          # "Inception-v3 (FID) weights"
    url: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def cached(self) -> Path:
        import torch
        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename

    def hash_prefix(self) -> Optional[str]:
        """The sha256 prefix torchvision-style names end with (alexnet-owt-7be5be79.pth)."""
        m = re.search(r"-([0-9a-f]{8,})\.pth$", self.filename)
        return m.group(1) if m else None


def offline(flag: bool = False) -> bool:
    """True when downloads are off: the option, or NEXTDETAIL_OFFLINE set to 1/true/yes."""
    return flag or os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes")


def weights_file(w: Weights, given=None, *, no_download: bool = False, option: str = "",
                 without: str = "") -> Path:
    """The local file of `w` (module docstring for the order). WeightsError otherwise.

    option : the flag that names the file ("--inception-weights"), offered as "or pass FLAG FILE";
    without: how to do without the weights, offered last ("--no-rfid leaves rFID out")."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise WeightsError(f"{option + ' ' if option else ''}{path}: no such file ({w.what}, from {w.url})")
        return path
    path = w.cached()
    if path.is_file():
        return path
    how = f"download {w.url} to {path}" + (f" or pass {option} FILE" if option else "")
    instead = f"; {without}" if without else ""
    if offline(no_download):
        raise WeightsError(f"{w.what} not found: {how} (downloads are off: --offline or {OFFLINE_ENV}){instead}")
    import torch
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from %s to %s", w.what, w.url, path)
    try:
        torch.hub.download_url_to_file(w.url, str(path), hash_prefix=w.hash_prefix(), progress=True)
    except Exception as e:  # noqa: BLE001 - no network, refused, wrong bytes: the same advice
        raise WeightsError(f"{w.what} not found and the download failed ({first_line(e)}): {how}{instead}") from None
    return path


def offline_opt():
    """The --offline option of every command that may fetch pretrained weights (written once)."""
    from .options import opt
    return opt(False, f"never download pretrained weights: use the given or cached files only "
                      f"(also: {OFFLINE_ENV}=1)")
