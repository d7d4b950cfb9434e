"""Full-reference image quality: PSNR and SSIM of an image against its reference."""
from __future__ import annotations

import math

import numpy as np


def psnr_from_mse(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (peak 1) from their mean squared error:

        PSNR = 10 log10(1 / MSE)

    +inf for MSE = 0 (identical images)."""
    return 10 * math.log10(1 / mse) if mse > 0 else float("inf")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two float images in [0, 1] of one shape (e.g. (H, W, 3)):

        PSNR = 10 log10(1 / MSE),  MSE = mean((a - b)^2) over every pixel and channel,

    the difference taken in float64. +inf for identical images."""
    return psnr_from_mse(float(np.mean((a.astype(np.float64) - b) ** 2)))


def ssim(a_HW3: np.ndarray, b_HW3: np.ndarray) -> float:
    """Structural similarity of two float images (H, W, 3) in [0, 1], in [-1, 1] (Wang et al. 2004):

        SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),

    the local means, variances and covariance weighted by an 11-tap Gaussian window of sigma
    1.5 px (population statistics), C1 = 0.01^2, C2 = 0.03^2 for data range 1; averaged over
    each channel's pixels at least 5 px from the border, then over the channels (scikit-image's
    `structural_similarity`). Images must be at least 11 px on a side."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(a_HW3, b_HW3, channel_axis=-1, data_range=1.0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False))
