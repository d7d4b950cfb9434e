"""Issue 24, part 5: a clean run looks clean. Both Ray jobs, run as a user runs them (a process of
their own, starting their own Ray), print their bar and summary and no error-level line, no
warning and no traceback: Ray Data's known-harmless core-worker line is filtered
(nextdetail.pipelines.native_log), nothing else is."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO
from nextdetail.pipelines.native_log import _harmless
from token_data import make_token_store

# glog's "[date time,ms E pid tid] file.cc:N: ..." and Python logging's "name: ERROR: ..."
ERROR_LINE = re.compile(r"^\[[^\]]* [EF] \d+ \d+\]|\bERROR\b|: error: |Traceback|\bWARNING\b", re.M)


def run_cli(*argv):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "nextdetail.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_both_ray_jobs_print_no_error_line(tmp_path):
    tokens, ckpt, store = make_token_store(tmp_path, n=4)
    listing = store.parent / "store.txt"
    for argv in (["decompose-dataset", listing, "--out", tmp_path / "store2", "--size", "32", "--n-iter", "3",
                  "--workers", "1"],
                 ["export-tokens", "--data", store, "--tokenizer", ckpt, "--out", tmp_path / "tokens2",
                  "--workers", "1"]):
        done = run_cli(*argv)
        assert done.returncode == 0, done.stderr
        assert ERROR_LINE.search(done.stderr) is None, done.stderr
        assert len(done.stdout.strip().splitlines()) == 1          # the summary line


def test_the_filter_drops_only_the_known_line():
    known = (b"[2026-12-04 19:01:03,123 E 1234 5678] core_worker.cc:2465: Actor with class name: "
             b"'MapWorker(MapBatches(DecomposeWorker))' and ID 'ab' has constructor arguments in the object store "
             b"and max_restarts > 0. If the arguments in the object store go out of scope ...\n")
    assert _harmless(known)
    assert not _harmless(b"[2026-12-04 19:01:03,123 E 1234 5678] core_worker.cc:900: Actor died unexpectedly\n")
