"""How long `decompose-dataset` takes to list a folder of a million images, and with how much memory.

Makes N empty .jpg files in 1,000 class folders (ImageNet's layout; empty files cost inodes, not
bytes; kept under out/bench-list/ for reruns), then lists them as the driver does
(`nextdetail.pipelines.sources.scan_source`) in a fresh process and reports the wall seconds and
that process's peak RSS (VmHWM) before and after. Targets: under a minute and under 1 GB at
1,000,000 files.

    python benchmarks/bench_list_folder.py [--files 1000000]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "bench-list"
CLASSES = 1000

CHILD = """
import json, sys, time
from pathlib import Path
def hwm():
    return next(int(l.split()[1]) / 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith("VmHWM:"))
sys.path.insert(0, sys.argv[2])
from nextdetail.pipelines.sources import scan_source
before = hwm()
t0 = time.perf_counter()
sources = list(scan_source(sys.argv[1]))
seconds = time.perf_counter() - t0
print(json.dumps({"images": len(sources), "seconds": seconds, "rss_before_mb": before,
                  "rss_peak_mb": hwm(), "classes": len({s.label for s in sources})}))
"""


def make_folder(n: int) -> Path:
    folder = OUT / f"files-{n}"
    if (folder / ".complete").exists():
        return folder
    for c in range(CLASSES):
        d = folder / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(c, n, CLASSES):
            (d / f"n{c:08d}_{i}.JPEG").touch()
    (folder / ".complete").touch()
    return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    a = ap.parse_args(argv)
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    t0 = time.perf_counter()
    folder = make_folder(a.files)
    print(f"folder: {folder} ({a.files:,} empty files in {CLASSES} class folders; made in "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(ROOT)], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"listed {r['images']:,} images in {r['classes']} classes in {r['seconds']:.1f} s "
          f"({r['images'] / r['seconds']:,.0f} files/s); driver peak RSS {r['rss_peak_mb']:.0f} MB "
          f"({r['rss_before_mb']:.0f} MB before listing)")


if __name__ == "__main__":
    main()
