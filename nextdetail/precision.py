"""Where models compute in bfloat16: the one rule both trainers and generation follow."""
from __future__ import annotations

import contextlib
from typing import ContextManager, Union

import torch


def bf16_autocast(device: Union[torch.device, str]) -> ContextManager:
    """The context the models' forward passes run in on `device`: bfloat16 autocast on CUDA,
    float32 elsewhere (a context that does nothing).

    bfloat16 keeps float32's exponent range, so the trainers need no loss scaling. The object
    may be entered again and again (once per step)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
