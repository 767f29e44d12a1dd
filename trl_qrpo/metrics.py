"""Small statistics used in logged metrics and evaluations (no trainer imports).

:func:`spearman_correlation` is the one rank correlation of the package: the trainer's length-bias metric, the
evaluation summaries and the experiments all call it, so they agree on ties and on when it is undefined.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch


def _as_float64(values) -> np.ndarray:
    """A flat float64 numpy copy of a tensor (any dtype or device, bf16 included), a numpy array or a list."""
    if isinstance(values, torch.Tensor):
        return values.detach().reshape(-1).to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def spearman_correlation(x, y) -> float | None:
    """Spearman's rank correlation of two equally long sequences (`scipy.stats.spearmanr`, average ranks for ties).

    Args:
        x, y (`torch.Tensor`, `numpy.ndarray` or list of numbers): the paired values, flattened.

    Returns:
        The correlation as a float, or None when it is undefined: fewer than 2 pairs, either input constant, or a NaN
        among the values.
    """
    from scipy.stats import spearmanr

    x, y = _as_float64(x), _as_float64(y)
    if x.shape != y.shape:
        raise ValueError(f"spearman_correlation needs two sequences of the same length, got {x.size} and {y.size}.")
    if x.size < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning: answered with None below
        rho = float(spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None
