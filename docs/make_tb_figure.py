"""The TensorBoard pictures of docs/tokenizer.md and docs/transformer.md, drawn with matplotlib
from a real run's event files (RUN/tb/) as TensorBoard's own reader (EventAccumulator) returns
them: a chart per tag in TensorBoard's layout (raw values faint, the default 0.6 smoothing bold),
and the images of the last checkpoint. Not a browser capture.

    .venv/bin/python docs/make_tb_figure.py RUN docs/tokenizer/tensorboard.png TAG...
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np


def smoothed(ys, weight=0.6):
    """TensorBoard's default smoothing: a debiased exponential moving average."""
    out, last, n = [], 0.0, 0
    for y in ys:
        n += 1
        last = last * weight + (1 - weight) * y
        out.append(last / (1 - weight ** n))
    return out


def draw(run: Path, path: Path, tags, columns: int = 4) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from nextdetail.tblog import read_events

    acc = read_events(run / "tb")
    have = acc.Tags()
    images = have["images"]
    panels = [t for t in tags if any(s == t or s.startswith(t + "/") for s in have["scalars"])]
    rows = -(-(len(panels) + len(images)) // columns)
    fig = Figure(figsize=(3.2 * columns, 2.4 * rows + 0.5), dpi=80, facecolor="#f5f5f5")
    FigureCanvasAgg(fig)
    fig.suptitle(f"TensorBoard curves of {run.name}/tb (drawn with matplotlib from the parsed event files)",
                 fontsize=10)
    colours = ["#ff7043", "#0077bb", "#009988", "#ee3377", "#33bbee", "#cc3311", "#bbbbbb", "#000000",
               "#ddaa33", "#aa4499"]
    for i, tag in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        series = sorted(s for s in have["scalars"] if s == tag or s.startswith(tag + "/"))
        for j, s in enumerate(series):
            ev = acc.Scalars(s)
            xs, ys = [e.step for e in ev], [e.value for e in ev]
            c = colours[j % len(colours)]
            ax.plot(xs, ys, color=c, alpha=0.25, linewidth=1)
            ax.plot(xs, smoothed(ys), color=c, linewidth=1.5, label=s[len(tag) + 1:] if s != tag else None)
        if len(series) > 1:
            ax.legend(fontsize=6, ncol=2, title="map", title_fontsize=6)
        ax.set_title(tag + ("/*" if len(series) > 1 else ""), fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for k, tag in enumerate(images):
        ax = fig.add_subplot(rows, columns, len(panels) + k + 1)
        last = acc.Images(tag)[-1]
        ax.imshow(np.asarray(Image.open(io.BytesIO(last.encoded_image_string)).convert("RGB")))
        ax.set_title(f"{tag}  step {last.step}", fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    # A 256-colour palette: a third of the bytes, and charts have few colours anyway.
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("tags", nargs="+", help="scalar tags, or a prefix of per-map tags (train/map_loss)")
    a = p.parse_args()
    draw(a.run, a.out, a.tags)
