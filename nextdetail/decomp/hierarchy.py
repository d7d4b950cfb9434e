"""Hierarchical image decompositions, pluggable by name.

CART's base-detail decomposition (the default) smooths recursively:

    B_0 = I,   B_k = AT(B_(k-1)).u,   D_k = B_(k-1) - B_k,   I = B_n + D_n + ... + D_1

so D_1 holds the finest detail and B_n the coarsest base. The paper's other two strategies
register beside it with `@register_decomposition("name")` and are reached through the same
`decompose` call, with the same additive structure (bases B_0..B_n, details D_k = B_(k-1) - B_k):

    specular   (specular.py)   A_0 = I .. A_n diffuse bases, E_1 .. E_n specular terms
    intrinsic  (intrinsic.py)  log space: B_0 = log I, B_1 = log S (shading), D_1 = log A (albedo)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Protocol, Tuple

import numpy as np

from .at import ambrosio_tortorelli
from .logspace import from_log
from .params import ATParams


@dataclass
class Decomposition:
    """Additive layers of an image (f's shape each; a leading N for a batch).

    bases   : [B_0 = I, B_1, ..., B_n]
    details : [D_1, ..., D_n], D_1 finest
    edges   : [s_1, ..., s_n], the AT edge field of each level (no channel axis)
    energies: [E_1, ..., E_n], the AT energy of each level (float, or (N,) for a batch)
    iterations: [T_1, ..., T_n], the AT sweeps of each level (int, or (N,) for a batch);
              empty, as energies, for a method without AT
    """

    bases: List[np.ndarray]
    details: List[np.ndarray]
    edges: List[np.ndarray]
    energies: list
    method: str = "base_detail"
    params: dict = field(default_factory=dict)
    names: Tuple[str, str] = ("B", "D")     # what bases and details are called (specular: A, E)
    space: str = "linear"                   # "log": the layers add up to log I (intrinsic)
    iterations: list = field(default_factory=list)

    @property
    def order(self) -> int:
        return len(self.details)

    @property
    def base(self) -> np.ndarray:
        """B_n, the coarsest base."""
        return self.bases[-1]

    @property
    def layers(self) -> List[np.ndarray]:
        """Generation order, coarse to fine: [B_n, D_n, ..., D_1]."""
        return [self.base] + self.details[::-1]

    @property
    def layer_names(self) -> List[str]:
        """Names of `layers`, e.g. [B_3, D_3, D_2, D_1], [A_4, E_4, ..., E_1], [S_1, A_1]."""
        return MethodInfo(self.names).layer_names(self.order)

    def linear_bases(self) -> List[np.ndarray]:
        """The bases as images in [0, 1] (what a store holds): as they are, or exp(.) - eps_I of
        a log-space decomposition's."""
        if self.space == "log":
            return [from_log(b) for b in self.bases]
        return list(self.bases)

    def reconstruct(self) -> np.ndarray:
        """B_n + D_n + ... + D_1, which is I up to float32 rounding."""
        out = self.base.astype(np.float32, copy=True)
        for d in self.details[::-1]:
            out += d
        return out


@dataclass(frozen=True)
class MethodInfo:
    """What the chain after the solver needs to know of a registered decomposition.

    names : what its bases and details are called (base_detail B, D; specular A, E; intrinsic S, A)
    space : "linear" (the layers add up to I) or "log" (they add up to log I)
    single_level : one base and one detail whatever `order` (intrinsic: order is the number of
                   smoothing levels of its shading, not a number of factors)
    summary : one phrase for the --method help
    """

    names: Tuple[str, str] = ("B", "D")
    space: str = "linear"
    single_level: bool = False
    summary: str = ""                    # what it is, for --help

    def levels(self, order: int) -> int:
        """n, the number of details of a decomposition of this `order` (its bases: n + 1)."""
        return 1 if self.single_level else int(order)

    def base_names(self, levels: int) -> List[str]:
        """The bases, finest first: [I, B_1, ..., B_n] (A_k for specular, S_1 for intrinsic)."""
        return ["I"] + [f"{self.names[0]}_{k}" for k in range(1, levels + 1)]

    def layer_names(self, levels: int) -> List[str]:
        """Generation order, coarse to fine: [B_n, D_n, ..., D_1] under this method's names."""
        b, d = self.names
        return [f"{b}_{levels}"] + [f"{d}_{k}" for k in range(levels, 0, -1)]


class Decomposer(Protocol):
    """A decomposition strategy: image (float32 in [0,1]) and order in, Decomposition out."""

    def __call__(self, image: np.ndarray, order: int, params: ATParams, backend: str) -> Decomposition: ...


_REGISTRY: Dict[str, Decomposer] = {}
_INFO: Dict[str, MethodInfo] = {}


def register_decomposition(name: str, **info) -> Callable[[Decomposer], Decomposer]:
    """Class/function decorator that makes a strategy reachable as decompose(..., method=name);
    `info` are MethodInfo fields (its factor names, space)."""
    def deco(fn: Decomposer) -> Decomposer:
        if name in _REGISTRY:
            raise ValueError(f"decomposition {name!r} is already registered")
        _REGISTRY[name] = fn
        _INFO[name] = MethodInfo(**info)
        return fn
    return deco


def available_decompositions() -> List[str]:
    return sorted(_REGISTRY)


def method_info(method: str) -> MethodInfo:
    """The MethodInfo of a registered decomposition; ValueError naming the known ones."""
    if method not in _INFO:
        raise ValueError(f"unknown decomposition {method!r}; available: {', '.join(available_decompositions())}")
    return _INFO[method]


def decomposition_name(method: str) -> str:
    """How messages and docs name a decomposition: "the base-detail decomposition" (never bare
    "base-detail", which would be confused with the BD quantizer, --quantizer basedetail)."""
    return f"the {method.replace('_', '-')} decomposition"


@register_decomposition("base_detail", summary="Mumford-Shah bases and details")
def base_detail(image: np.ndarray, order: int, params: ATParams, backend: str) -> Decomposition:
    """CART's base-detail decomposition by repeated AT smoothing (whole batch per level)."""
    bases, details, edges, energies, sweeps = [image], [], [], [], []
    for _ in range(order):
        r = ambrosio_tortorelli(bases[-1], params.alpha, params.lam, params.eps, backend=backend,
                                omega=params.omega, n_iter=params.n_iter, tol=params.tol)
        details.append(bases[-1] - r.u)
        bases.append(r.u)
        edges.append(r.s)
        energies.append(r.energy)
        sweeps.append(r.iterations)
    return Decomposition(bases, details, edges, energies, "base_detail", params.to_dict(), iterations=sweeps)


def decomposition_bytes(side: int, order: int, batch: int = 1, channels: int = 3) -> int:
    """Bytes of one solver call on `batch` images of side x side, float32: what `decompose`
    returns (order + 1 bases and order details of `channels`, order edge fields) and what the AT
    solver holds while it runs (its image, u, s and about nine more planes of scratch):

        4 B x side^2 x batch x ((2 order + 1) channels + order + 12)
    """
    planes = (2 * order + 1) * channels + order + 12
    return 4 * side * side * batch * planes


def decompose(image, order: int = 3, *, method: str = "base_detail", backend: str = "auto",
              **at_params) -> Decomposition:
    """Decompose an image (H,W), (H,W,C) or batch (N,H,W,C), float in [0,1], into `order` levels.

    `at_params` are ATParams fields (alpha, lam, eps, omega, n_iter, tol).
    """
    method_info(method)
    if int(order) != order or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    try:
        params = ATParams(**at_params)
    except TypeError as e:
        raise TypeError(f"decompose: {e}") from None
    from .at import as_batch
    f_NHWC, shape, _ = as_batch(image)          # validate once, up front
    return _REGISTRY[method](f_NHWC.reshape(shape), int(order), params, backend)
