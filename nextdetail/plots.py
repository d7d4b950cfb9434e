"""Line charts with matplotlib (Agg, no display): loss curves of the trainers and the
reconstruction error per quantization depth. Image grids (contact sheets, samples) are PIL,
in viz.py; these are charts people read and restyle.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Sequence, Tuple

from .storage import as_path
from .stores.atomic import atomic_write

Series = Dict[str, Tuple[Sequence[float], Sequence[float]]]


def line_plot(series: Series, path, *, title: str = "", xlabel: str = "", ylabel: str = "",
              log_y: bool = False, size=(8.0, 4.8), dpi: int = 100) -> Path:
    """Write a chart of `series` {name: (xs, ys)} to `path` (PNG): one line each, labelled axes
    (log10 y when log_y, non-positive values then left out), grid, legend. Non-finite points
    are skipped; markers are drawn when a series has few points."""
    # The object API with its own canvas: no pyplot state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for name, (xs, ys) in series.items():
        pts = [(float(x), float(y)) for x, y in zip(xs, ys)
               if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, linewidth=1.5,
                    marker="o" if len(pts) <= 40 else None, markersize=3)
            drawn += 1
    if log_y and drawn:
        ax.set_yscale("log")
    if not drawn:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (log scale)" if log_y and drawn else ""))
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(loc="best")
    fig.tight_layout()
    path = as_path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
