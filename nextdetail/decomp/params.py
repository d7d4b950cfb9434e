"""Typed parameters of the Ambrosio-Tortorelli solver."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..options import opt
from .energy import CHECK_EVERY

TOL = 2.5e-3   # the default tol: chosen from measurements (docs/decomposition.md)


@dataclass(frozen=True)
class ATParams:
    """Parameters of E(u, s) (see `nextdetail.decomp.energy`) and of its solver.

    alpha : smoothness weight (CART v1 uses 10, v2 uses 1).
    lam   : edge-length weight.
    eps   : edge width in pixels. With unit grid spacing and eps = 0.01 the eps |grad s|^2
            term is tiny and s is nearly a pointwise function of |grad u|^2; raise eps
            (e.g. 1-2 px) for a diffuse, connected edge set.
    omega : over-relaxation of the red-black SOR u-step, 0 < omega < 2.
    n_iter: the most sweeps (one sweep = both colours, s and u updated at every pixel).
    tol   : convergence tolerance, per image: its sweeps stop at the first check (every
            CHECK_EVERY sweeps) where E fell by at most tol * E over the last CHECK_EVERY
            sweeps (`nextdetail.decomp.energy.converged`); 0 runs n_iter sweeps always. The
            default is the loosest value that keeps the quality bar on held-out photographs
            with a margin; see docs/decomposition.md, "Quality and speed".
    """

    alpha: float = opt(10.0, "smoothness weight", gt=0)
    lam: float = opt(0.01, "edge-length weight", gt=0)
    eps: float = opt(0.01, "edge width in px", gt=0)
    omega: float = opt(1.6, "SOR relaxation in (0,2)", gt=0, lt=2)
    n_iter: int = opt(50, "most solver sweeps per level", ge=1)
    tol: float = opt(TOL, f"stop an image's sweeps when E fell by <= this fraction over {CHECK_EVERY} "
                          "sweeps (0: always --n-iter)", ge=0, lt=1)

    def __post_init__(self):
        if not (self.alpha >= 0 and float(self.alpha) < float("inf")):
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if not (self.lam > 0 and float(self.lam) < float("inf")):
            raise ValueError(f"lam must be a finite number > 0, got {self.lam!r}")
        if not (self.eps > 0 and float(self.eps) < float("inf")):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if not (0 < self.omega < 2):
            raise ValueError(f"omega must lie in (0, 2) for SOR to descend, got {self.omega!r}")
        if int(self.n_iter) != self.n_iter or self.n_iter < 0:
            raise ValueError(f"n_iter must be an integer >= 0, got {self.n_iter!r}")
        if not (0 <= self.tol < 1):
            raise ValueError(f"tol must be a number in [0, 1), got {self.tol!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ATParams":
        """The parameters a store or run recorded. Records written before `tol` existed ran
        n_iter sweeps always: their missing tol is 0, not today's default."""
        return cls(**{"tol": 0.0, **d})
