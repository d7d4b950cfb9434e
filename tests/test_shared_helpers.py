"""The small helpers several commands share: file digests, bf16 autocast, step generators and
the /proc reader of the memory limits."""
from __future__ import annotations

import contextlib
import hashlib
import warnings

import torch

from nextdetail.checksum import file_sha256
from nextdetail.distributed import step_generator
from nextdetail.limits import _proc_kb
from nextdetail.precision import bf16_autocast


def test_file_sha256_is_the_digest_of_the_whole_file_whatever_the_chunk(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert file_sha256(tmp_path / "f") == want
    assert file_sha256(tmp_path / "f", chunk=1000) == want


def test_bf16_autocast_on_cuda_only():
    assert isinstance(bf16_autocast("cpu"), contextlib.nullcontext)
    assert isinstance(bf16_autocast(torch.device("cpu")), contextlib.nullcontext)
    with warnings.catch_warnings():          # torch warns when it has no CUDA to autocast on
        warnings.simplefilter("ignore")
        amp = bf16_autocast(torch.device("cuda", 0))
    assert isinstance(amp, torch.autocast) and amp.fast_dtype == torch.bfloat16
    with bf16_autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_step_generator_depends_on_seed_and_step_alone():
    draw = lambda seed, step: torch.rand(4, generator=step_generator(seed, step))   # noqa: E731
    assert torch.equal(draw(3, 7), draw(3, 7))
    assert torch.equal(draw(3, 7), torch.rand(4, generator=torch.Generator().manual_seed(3 * 1_000_003 + 7)))
    assert not torch.equal(draw(3, 7), draw(3, 8)) and not torch.equal(draw(3, 7), draw(4, 7))


def test_proc_kb_reads_one_line_in_bytes(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       2048 kB\nMemAvailable:   1024 kB\nVmSize:\tbad kB\n")
    assert _proc_kb(str(f), "MemAvailable") == 1024 * 1024
    assert _proc_kb(str(f), "MemTotal") == 2048 * 1024
    assert _proc_kb(str(f), "MemFree") is None
    assert _proc_kb(str(f), "VmSize") is None
    assert _proc_kb(str(tmp_path / "absent"), "MemAvailable") is None
