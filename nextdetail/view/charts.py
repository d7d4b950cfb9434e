"""Charts for the page: line charts drawn server-side with matplotlib (Agg, its object API: no
pyplot state, safe from the server's threads) into PNG bytes, and codebook-usage histograms as
small inline SVG (a few hundred bars; no request, no JavaScript).

nextdetail.plots.line_plot draws the trainers' loss.png the same way but writes a file; the viewer
writes nothing, so this draws into memory, in the same style.
"""
from __future__ import annotations

import io
import math
import re
import threading
from html import escape
from typing import Dict, Sequence, Tuple

import numpy as np

from ..runs import running_mean

Series = Dict[str, Tuple[Sequence[float], Sequence[float]]]
_DRAW = threading.Lock()            # matplotlib's font cache and text layout are not thread-safe


def line_chart(series: Series, *, title: str = "", xlabel: str = "step", ylabel: str = "", log_y: bool = False,
               smooth: bool = True, size=(7.2, 3.6), dpi: int = 100) -> bytes:
    """PNG bytes of one line per series (running mean over ~1/50 of the points when `smooth`:
    per-step losses of small batches are too noisy to read)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with _DRAW:
        fig = Figure(figsize=size, dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        drawn = 0
        for name, (xs, ys) in sorted(series.items(), key=lambda kv: _natural(kv[0])):
            pts = [(float(x), float(y)) for x, y in zip(xs, ys)
                   if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
            if not pts:
                continue
            px, py = [x for x, _ in pts], [y for _, y in pts]
            if smooth and len(py) > 50:
                py = running_mean(py, max(1, len(py) // 50))
            ax.plot(px, py, label=name, linewidth=1.4, marker="o" if len(pts) <= 40 else None, markersize=3)
            drawn += 1
        if log_y and drawn:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)      # 64.0097, not "+6.399e1" and 0.0097
        if not drawn:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if drawn > 6:               # many series (one per token map): the legend beside the axes
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
        elif drawn:
            ax.legend(loc="best", fontsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    return buf.getvalue()


def _natural(name: str) -> tuple:
    """'map 2' before 'map 10'; train series before val ones."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def depth_chart(rows: Sequence[dict], metric: str = "mse") -> bytes:
    """eval-tokenizer's per-depth chart (CART Figure 11) from eval.csv rows: `metric` against the
    quantization depth, one line per run."""
    series: Dict[str, Tuple[list, list]] = {}
    for r in rows:
        try:
            x, y = float(r["depth"]), float(r[metric])
        except (KeyError, TypeError, ValueError):
            continue
        xs, ys = series.setdefault(f"{r.get('run', '?')} ({r.get('quantizer', '?')})", ([], []))
        xs.append(x)
        ys.append(y)
    return line_chart(series, title=f"reconstruction {metric.upper()} after each quantization depth",
                      xlabel="token maps used (depth)", ylabel=metric, log_y=metric in ("mse", "lpips"), smooth=False)


def usage_svg(sorted_counts: np.ndarray, *, width: int = 220, height: int = 70, bars: int = 110) -> str:
    """An inline SVG bar chart of a map's code counts, most used first (binned to at most `bars`
    bars, each the largest count of its bin; log height, so one dominant code does not hide the
    rest). Empty codes leave the tail blank: a collapsed map is a short left-hand stub."""
    c = np.asarray(sorted_counts, np.float64)
    if c.size == 0 or c.max() <= 0:
        return f'<svg class="hist" width="{width}" height="{height}" role="img"><title>no tokens</title></svg>'
    nb = min(bars, c.size)
    edges = np.linspace(0, c.size, nb + 1).astype(int)
    peak = np.array([c[a:b].max() if b > a else 0 for a, b in zip(edges[:-1], edges[1:])])
    h = np.where(peak > 0, np.log1p(peak) / np.log1p(c.max()), 0.0) * (height - 2)
    w = width / nb
    rects = "".join(f'<rect x="{i * w:.2f}" y="{height - v:.2f}" width="{max(w - 0.3, 0.6):.2f}" height="{v:.2f}"/>'
                    for i, v in enumerate(h) if v > 0)
    used = int((c > 0).sum())
    label = escape(f"{used} of {c.size} codes used; most used code {int(c.max())} times")
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'preserveAspectRatio="none" role="img">'
            f'<title>{label}</title><line x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}" '
            f'class="axis"/>{rects}</svg>')
