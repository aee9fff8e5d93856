"""Per-scan normalisation of map terms by the scan's own brain statistics, so one threshold fits a batch.

A residual's scale drifts from scan to scan (scanner, contrast, noise, how well the model knows the
anatomy); the median and the median absolute deviation over the brain are barely moved by lesions, which
cover a small share of it, so dividing by them puts every scan's healthy tissue on one scale.
"""

from __future__ import annotations

import numpy as np

#: MAD of a normal distribution times this is its standard deviation.
MAD_TO_SIGMA = 1.4826
_SAMPLE = 2_000_000


def _sample(values: np.ndarray) -> np.ndarray:
    """A strided subsample of a large set of values (percentiles stay exact to well under 0.1 %)."""
    if values.size <= _SAMPLE:
        return values
    return values[:: int(np.ceil(values.size / _SAMPLE))]


def robust_stats(values: np.ndarray, eps: float = 1e-6) -> tuple[float, float]:
    """Median and robust spread (1.4826 x MAD, at least ``eps``) of a set of values."""
    values = _sample(np.asarray(values, dtype=np.float32).ravel())
    if values.size == 0:
        return 0.0, 1.0
    median = float(np.median(values))
    spread = MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    if spread <= eps:  # a term that is zero on most of the brain: fall back to its mean absolute deviation
        spread = float(np.mean(np.abs(values - median)))
    return median, max(spread, eps)


def robust_z(values: np.ndarray, mask: np.ndarray, scale_of: np.ndarray | None = None) -> np.ndarray:
    """``(values - median) / spread`` over the brain ``mask``; with ``scale_of``, ``values / spread`` of
    that other array (a term already floored, such as intensity above a percentile, keeps its zero)."""
    if scale_of is not None:
        _, spread = robust_stats(scale_of[mask])
        return (values / spread).astype(np.float32)
    median, spread = robust_stats(values[mask])
    return ((values - median) / spread).astype(np.float32)
