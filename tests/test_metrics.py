"""PSNR and SSIM (nextdetail.evaluation.metrics), the numbers eval-tokenizer and upscale report."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nextdetail.evaluation.metrics import psnr, psnr_from_mse, ssim


def images(seed: int = 0, side: int = 32):
    rng = np.random.default_rng(seed)
    a = rng.random((side, side, 3), dtype=np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape).astype(np.float32), 0, 1)
    return a, b


def test_psnr_is_ten_log10_of_one_over_the_mse():
    assert psnr_from_mse(0.01) == pytest.approx(20.0)
    assert psnr_from_mse(1.0) == 0.0
    assert psnr_from_mse(0.0) == float("inf")
    a, b = images()
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    assert psnr(a, b) == 10 * math.log10(1 / mse)
    assert psnr(a, b) == psnr(b, a)
    assert psnr(a, a) == float("inf")


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    a, b = images()
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    worse = np.clip(a + np.random.default_rng(1).normal(0, 0.2, a.shape).astype(np.float32), 0, 1)
    assert -1 <= ssim(a, worse) < ssim(a, b) < 1
