"""The map schedule of a quantizer: the side of every token map and the residual stages they form.

    s = map_schedule(quant_cfg, latent)       # quant_cfg: a QuantConfig with its defaults filled in
    s.sizes         # (p_1, ..., p_M): side of each map, generation order
    s.stages        # ((0, B), (B, B + d), ..., (M - d, M)): first map, last map + 1 of each stage
    s.num_base      # B: the maps of the first stage (every map, for a one-stage quantizer)
    s.order         # n: the stages after it, one per detail factor (the bases B_1..B_n it takes)
    s.stage_ends    # [B, B + d, ..., M]

A stage is a run of maps that residually quantizes one target: vanilla and multiscale code f_I in
one stage; basedetail codes f_Bn in its base stage, then D_n, ..., D_1 in `order` stages of
`detail_depth` maps each. The quantizer (quant.py) holds its schedule; the rest of the package
reads the schedule from it (or, with a config only, from `TokenizerConfig.map_schedule`). No
torch: a checkpoint's config gives its schedule without building a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from ..errors import ConfigError
from ..options import flag_of


def stage_bounds(num_maps: int, num_base: int, order: int) -> Tuple[Tuple[int, int], ...]:
    """(first map, last map + 1) of each stage: maps 0..num_base-1, then `order` stages of
    (num_maps - num_base) / order maps; one stage of every map when there is no detail stage."""
    if order < 1 or num_base >= num_maps:
        return ((0, num_maps),)
    d = (num_maps - num_base) // order
    ends = [num_base + j * d for j in range(order)] + [num_maps]
    return tuple(zip([0] + ends[:-1], ends))


def stage_ends(num_maps: int, num_base: int, order: int) -> List[int]:
    """Number of maps after the base and after each detail factor: [B, B + d, ..., M]."""
    return [hi for _, hi in stage_bounds(num_maps, num_base, order)]


@dataclass(frozen=True)
class MapSchedule:
    sizes: Tuple[int, ...]
    num_base: int
    order: int

    @property
    def stages(self) -> Tuple[Tuple[int, int], ...]:
        return stage_bounds(len(self.sizes), self.num_base, self.order)

    @property
    def stage_ends(self) -> List[int]:
        return [hi for _, hi in self.stages]


def _ends_at_latent(q, name: str, latent: int) -> None:
    """q: the QuantConfig whose field `name` holds the sizes."""
    sizes = getattr(q, name)
    if sizes[-1] != latent:
        raise ConfigError(f"{flag_of(type(q), name)} {','.join(map(str, sizes))} must end at the latent side "
                          f"{latent} (the image side / the downsampling); see scale_patch_sizes")


def _vanilla(q, latent: int, check: bool) -> MapSchedule:
    return MapSchedule((latent,) * q.depth, q.depth, 0)


def _multiscale(q, latent: int, check: bool) -> MapSchedule:
    if check:
        _ends_at_latent(q, "patch_sizes", latent)
    return MapSchedule(tuple(q.patch_sizes), len(q.patch_sizes), 0)


def _basedetail(q, latent: int, check: bool) -> MapSchedule:
    if check:
        _ends_at_latent(q, "base_patch_sizes", latent)
    base = tuple(q.base_patch_sizes)
    return MapSchedule(base + (latent,) * (q.order * q.detail_depth), len(base), q.order)


# quantizer kind -> its schedule; a new quantizer adds its entry here and its class in quant.py
KIND_SCHEDULES = {"vanilla": _vanilla, "multiscale": _multiscale, "basedetail": _basedetail}


def map_schedule(q, latent: int, check: bool = True) -> MapSchedule:
    """The schedule of a QuantConfig `q` whose defaults are filled in (`QuantConfig.schedule`) on
    a latent of side `latent`; ConfigError when its sizes do not end at that side (unless not `check`)."""
    return KIND_SCHEDULES[q.kind](q, latent, check)
