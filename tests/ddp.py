"""Two torch.distributed processes on one machine, as torchrun would set them up (gloo on CPU)."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port nobody listens on now, for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_world(rank: int, world: int, port: int) -> None:
    """torchrun's environment for process `rank` of `world` on this machine."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
