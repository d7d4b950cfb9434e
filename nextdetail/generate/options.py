"""What the generation commands share: how tokens are drawn (`DrawOptions`, validated here once
for `sample`, `upscale` and `edit`), and the one error they raise."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, NextDetailError
from ..limits import check_max_memory, memory_opt
from ..options import opt


class SampleError(NextDetailError, ValueError):
    """Sampling cannot run as asked (run folder, tokenizer, class, options); one line."""


@dataclass(frozen=True, kw_only=True)
class DrawOptions:
    """What `sample`, `upscale` and `edit` share: how tokens are drawn, where the run is loaded."""

    top_k: int = opt(0, "keep the k most likely tokens; 0: all", ge=0)
    top_p: float = opt(0.0, "nucleus sampling mass; 0: off", ge=0, le=1)
    temperature: float = opt(1.0, "softmax temperature", gt=0)
    tokenizer: Optional[Path] = opt(None, "the tokenizer run, when it moved since training (its sha256 must "
                                          "match)", metavar="RUN")
    device: str = opt("cpu", "torch device")
    max_memory: Optional[str] = memory_opt()

    def __post_init__(self):
        if not 0.0 <= self.top_p <= 1.0 or self.top_k < 0 or self.temperature <= 0:
            raise ConfigError(f"--top-p {self.top_p}, --top-k {self.top_k}, --temperature {self.temperature}: "
                              f"need 0 <= top-p <= 1, top-k >= 0, temperature > 0")
        check_max_memory(self.max_memory)

    def draw(self) -> dict:
        """The keywords of `generate` that shape each draw: top_k, top_p, temperature."""
        return {"top_k": self.top_k, "top_p": self.top_p, "temperature": self.temperature}


def settings_of(cls, given, fields: dict):
    """The settings a generation function runs with: `given` (an instance of cls, e.g. the
    command's config, which subclasses it) with `fields` replaced, or cls(**fields); validated by
    cls either way, so every default and check is written once, in cls."""
    if given is None:
        return cls(**fields)
    return replace(given, **fields) if fields else given
