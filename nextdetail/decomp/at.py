"""Public entry point of the Ambrosio-Tortorelli (AT) solver: shapes, checks, backends."""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .params import TOL, ATParams

log = logging.getLogger(__name__)

BACKENDS = ("auto", "numpy", "numba", "cupy")


@dataclass
class ATResult:
    """Output of `ambrosio_tortorelli`.

    u : smoothed image, the shape of f.
    s : edge field, f's shape without the channel axis (near 1 on edges).
    energy : E(u, s), a float for one image, an array (N,) for a batch.
    iterations : sweeps run, an int for one image, an int array (N,) for a batch (each image
        stops on its own when it has converged, see `tol`).
    energy_history : (T + 1,) or (T + 1, N) energies from u = f on, T the most sweeps any
        image ran (an image that stopped keeps its energy), when asked for with
        track_energy=True, else None.
    backend : the backend that ran.
    """

    u: np.ndarray
    s: np.ndarray
    energy: "float | np.ndarray"
    iterations: "int | np.ndarray"
    energy_history: Optional[np.ndarray]
    backend: str


def cupy_usable() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or a CUDA runtime/driver error
        return False


def resolve_backend(backend: str) -> str:
    """The backend that runs for `backend`, its module importable.

    'auto' is cupy with a usable GPU, else numba, and falls back to numpy (with a warning) when
    the compiled backend cannot be imported, so a broken numba install slows a run down instead
    of stopping it; a backend asked for by name must work (RuntimeError otherwise).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "cupy" and not cupy_usable():
        raise RuntimeError("backend 'cupy' asked for, but cupy is not installed or sees no CUDA device "
                           "(pip install 'nextdetail[gpu]')")
    resolved = backend if backend != "auto" else ("cupy" if cupy_usable() else "numba")
    try:
        importlib.import_module(f"{__package__}.backend_{resolved}")
    except ImportError as e:
        if backend != "auto" or resolved == "numpy":
            raise RuntimeError(f"backend {resolved!r} is not available ({e})") from None
        log.warning("backend %s is not available (%s); using numpy, which is much slower", resolved, e)
        return "numpy"
    return resolved


def to_host(a) -> np.ndarray:
    """A numpy array of a (a cupy array is copied from the GPU)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def as_batch(f) -> tuple[np.ndarray, tuple, bool]:
    """Bring f to a float32 (N, H, W, C) batch. Returns it, f's shape and whether f had a channel axis."""
    xp = np
    if type(f).__module__.startswith("cupy"):
        import cupy as xp  # keep GPU arrays on the GPU
    if not hasattr(f, "dtype"):
        f = np.asarray(f)
    if f.dtype.kind not in "fiub" or f.dtype.kind == "b":
        raise TypeError(f"image must be a real numeric array, got dtype {f.dtype}")
    if f.dtype.kind in "iu":
        raise TypeError(f"image must be float in [0, 1], got integer dtype {f.dtype} (divide by 255 or 65535)")
    shape = tuple(f.shape)
    if f.ndim == 2:
        f4 = f[None, :, :, None]
    elif f.ndim == 3:
        f4 = f[None]
    elif f.ndim == 4:
        f4 = f
    else:
        raise ValueError(f"image must have shape (H,W), (H,W,C) or (N,H,W,C), got {shape}")
    if min(f4.shape) == 0:
        raise ValueError(f"image has an empty axis: shape {shape}")
    f4 = xp.ascontiguousarray(f4, dtype=xp.float32)
    if not bool(xp.isfinite(f4).all()):
        raise ValueError("image contains NaN or inf values")
    return f4, shape, f.ndim != 2


def ambrosio_tortorelli(f, alpha: float = 10.0, lam: float = 0.01, eps: float = 0.01, *,
                        backend: str = "auto", omega: float = 1.6, n_iter: int = 50,
                        tol: float = TOL, track_energy: bool = False) -> ATResult:
    """Mumford-Shah smoothing by Ambrosio-Tortorelli alternating minimization.

    Minimizes, from u = f (see `nextdetail.decomp.energy` for the discretization),

        E(u, s) = sum (u - f)^2 + alpha sum (1 - s)^2 |grad u|^2
                + lam sum [eps |grad s|^2 + s^2 / (4 eps)]

    by red-black sweeps, each updating s exactly and u by SOR at every pixel; E never
    increases from one sweep to the next. Each image stops when its E fell by at most
    tol * E over the last CHECK_EVERY (5) sweeps, or after n_iter sweeps (rule and its
    checks: `nextdetail.decomp.energy`); the decision depends on that image alone, never on
    its batch, the threads or the backend's schedule.

    Parameters
    ----------
    f : array, float in [0, 1], shape (H, W), (H, W, C) or a batch (N, H, W, C)
        A cupy array stays on the GPU (cupy backend).
    alpha, lam, eps : float
        Smoothness weight, edge-length weight, edge width (pixels). Defaults are CART's.
    backend : 'auto' (cupy with a GPU, else numba), 'numba', 'numpy' or 'cupy'.
    omega : SOR relaxation in (0, 2).
    n_iter : the most sweeps.
    tol : relative energy decrease over CHECK_EVERY sweeps below which an image stops, in
        [0, 1); 0 runs n_iter sweeps always.
    track_energy : also return E after every sweep (slower; for diagnostics).

    Returns
    -------
    ATResult with u (f's shape, float32), s (f's shape without channels), energy, iterations
    (sweeps per image).
    """
    p = ATParams(alpha=alpha, lam=lam, eps=eps, omega=omega, n_iter=n_iter, tol=tol)
    f_NHWC, shape, has_channels = as_batch(f)
    name = resolve_backend(backend)
    if name == "numpy":
        from . import backend_numpy as impl
    elif name == "numba":
        from . import backend_numba as impl
    else:
        from . import backend_cupy as impl
    u_NHWC, s_NHW, energy_N, history, sweeps_N = impl.solve(f_NHWC, p, track_energy=track_energy)
    batched = len(shape) == 4
    u = u_NHWC.reshape(shape)
    s = s_NHW if batched else s_NHW[0]
    energy = np.asarray(energy_N, dtype=np.float64)
    iterations = np.asarray(sweeps_N, dtype=np.int64)
    if history is not None:
        history = np.asarray(history, dtype=np.float64)
    if not batched:
        energy = float(energy[0])
        iterations = int(iterations[0])
        history = history[:, 0] if history is not None else None
    return ATResult(u=u, s=s, energy=energy, iterations=iterations, energy_history=history, backend=name)
