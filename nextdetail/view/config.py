"""`nextdetail view`'s options (a typed config, as every command's)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from ..errors import ConfigError
from ..options import opt
from ..storage import as_path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ViewConfig:
    """Settings of `nextdetail view`."""

    paths: Tuple[Path, ...] = opt(help="decomposition stores, token stores, run folders, model folders, output "
                                       "folders of sample/upscale/edit/eval-tokenizer, ADM .npz files",
                                  positional=True, metavar="PATH", nargs="+", type=as_path)
    host: str = opt("127.0.0.1", "address to listen on; anything but the loopback exposes the data to the network "
                                 "(a warning says so)", metavar="HOST")
    port: int = opt(0, "port to listen on; 0 picks a free one (the URL is printed)", ge=0, le=65535)
    tokenizer: Optional[Path] = opt(None, "the token stores' tokenizer (run, checkpoint or model folder): their "
                                          "reconstructions per depth are shown; refused unless its sha256 is the "
                                          "one they were exported with", metavar="RUN")
    per_page: int = opt(60, "thumbnails per page of a store's grid", ge=1, le=500)

    def __post_init__(self):
        if not self.host.strip():
            raise ConfigError("--host must name an address, e.g. 127.0.0.1")

    @property
    def exposed(self) -> bool:
        """Whether the host is reachable from other machines."""
        return self.host not in LOOPBACK
