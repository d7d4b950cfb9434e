"""The log space of the intrinsic decomposition, and its unit-log mapping onto [0, 1].

    y = log(x + eps_I),  eps_I = 1/255 (one 8-bit step keeps black finite)
    t(x) = (y - ln eps_I) / (ln(1 + eps_I) - ln eps_I):  t(0) = 0, t(1) = 1

Stores hold images; readers and tokenizers of a log-space decomposition work in t (stores/shards.py).
"""
from __future__ import annotations

import numpy as np

LOG_EPS = 1.0 / 255.0            # eps_I: one 8-bit step

# The log range of [0, 1]: ln(eps_I) .. ln(1 + eps_I), 5.55 natural-log units.
LOG_LO = float(np.log(np.float32(LOG_EPS)))
LOG_RANGE = float(np.log1p(np.float32(LOG_EPS)) - LOG_LO)


def to_log(x: np.ndarray) -> np.ndarray:
    """log(x + eps_I), float32."""
    return np.log(np.asarray(x, np.float32) + np.float32(LOG_EPS))


def from_log(y: np.ndarray) -> np.ndarray:
    """exp(y) - eps_I, float32: the inverse of to_log."""
    return np.exp(np.asarray(y, np.float32)) - np.float32(LOG_EPS)


def to_unit_log(x: np.ndarray) -> np.ndarray:
    """t(x) = (ln(x + eps_I) - ln eps_I) / (ln(1 + eps_I) - ln eps_I), float32: the log of an image
    mapped so that t(0) = 0 and t(1) = 1. What the tokenizer sees of a log-space store: an
    "image" in [0, 1] whose sums are products (t(A S) = t(S) + ln A / LOG_RANGE)."""
    return ((to_log(x) - np.float32(LOG_LO)) / np.float32(LOG_RANGE)).astype(np.float32)


def from_unit_log(t):
    """exp(t LOG_RANGE + ln eps_I) - eps_I, the inverse of to_unit_log: back to an image in [0, 1].
    Takes numpy arrays or torch tensors (the sampler decodes on the device)."""
    x = t * LOG_RANGE + LOG_LO
    return (x.exp() if hasattr(x, "exp") else np.exp(x)) - LOG_EPS
