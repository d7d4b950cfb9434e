"""torchrun's processes, for both trainers: who this process is and the few collectives they use.

    report = run(cfg.device, lambda d: _train(cfg, d, ...))    # set up, run, leave together
    device = d.device(cfg.device)          # cuda -> this rank's GPU (LOCAL_RANK)

gloo on the CPU (how the tests run two ranks), nccl on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, TypeVar

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local: int = 0
    owned: bool = False          # this module initialised the process group

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The torch device of this process: "cuda" is this rank's GPU (LOCAL_RANK) under torchrun,
        made the current one (NCCL's collectives run on the current device)."""
        if name.startswith("cuda") and self.world > 1:
            name = f"cuda:{self.local}"
            torch.cuda.set_device(name)
        return torch.device(name)


def main_process() -> bool:
    """Whether this process is rank 0 of torchrun's world (or alone), known before any set-up:
    the one that shows progress and prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(device: str) -> Dist:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); world 1 without it."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local, owned)


T = TypeVar("T")


def run(device: str, body: Callable[[Dist], T]) -> T:
    """body(d) in this process's place of torchrun's world (set up from the environment), then
    `leave` together; after a failure the process group is torn down without waiting."""
    d = setup_distributed(device)
    try:
        out = body(d)
    except BaseException:
        leave(d, ok=False)
        raise
    leave(d)
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded with 1,000,003 seed + step, so that a step's draws (label dropout,
    dead-code restarts) depend on (seed, step) alone: the same on every rank and after a resume.
    Pairs with step < 1,000,003 get distinct seeds."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """t summed over the ranks, in place (t itself when alone)."""
    if d.world > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's t (same shape on each) concatenated along dim 0 in rank order."""
    if d.world == 1:
        return t
    import torch.distributed as dist
    parts: List[torch.Tensor] = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def leave(d: Dist, *, ok: bool = True) -> None:
    """End of a run. ok: every rank waits for the others (rank 0 may still be writing its last
    checkpoint and plot; a rank that tore gloo down and exited meanwhile was seen to abort,
    SIGABRT "terminate called without an active exception", in 1 of 6 CI runs). Then the process
    group this module made is destroyed (also after a failure, without waiting)."""
    if d.world > 1:
        import torch.distributed as dist
        if ok:
            dist.barrier()
        if d.owned and dist.is_initialized():
            dist.destroy_process_group()
