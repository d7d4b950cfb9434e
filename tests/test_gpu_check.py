"""The prepared GPU check runs end to end on the CPU (--dry-run, toy sizes), without ray, zarr
or lpips importable, as on a GPU machine's stock Python: a GPU window is never spent on a plan
that fails or an import that is missing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_without_ray_zarr_or_lpips(tmp_path):
    blocked = tmp_path / "blocked"
    for name in ("ray", "zarr", "lpips"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on a GPU machine')\n")
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == ["cupy_tests", "at_solver", "tokenizer_train", "transformer_train", "export_encode"]
    assert all(p["status"] == "ok" for p in parts.values()), parts
    assert [b["batch"] for b in parts["at_solver"]["batches"]] == [2, 4]
    assert all(b["first_image_max_diff_to_first_batch"] == 0 for b in parts["at_solver"]["batches"])
    assert parts["export_encode"]["same_tokens_batch_n_vs_7"] is True
    assert parts["transformer_train"]["tokens_per_s"] > 0 and parts["tokenizer_train"]["images_per_s"] > 0
    assert "export_encode" in r.stdout.splitlines()[-2] and r.stdout.splitlines()[-1].startswith("wrote ")


def test_gpu_check_refuses_an_unknown_part():
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--parts", "at_solver,nope"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown nope" in r.stderr
