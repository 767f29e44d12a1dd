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


def within_prompt_length_slope(rewards: list, lengths: list) -> float | None:
    """The slope of reward on length pooled over prompts, each prompt with its own intercept (a fixed-effects
    regression): sum over prompts and samples of (l - mean_l) (r - mean_r), over the sum of (l - mean_l)^2, the means
    taken per prompt.

    This is the regression behind a length-controlled reward (`evaluate`): fitted on the reference model's own samples
    of each prompt, it says how much reward one more token brings at equal prompt, and
    `reward - slope * (length - the prompt's mean reference length)` compares samples of different lengths.

    Args:
        rewards, lengths (lists of per-prompt sequences of numbers): the reference samples' rewards and lengths, one
            inner sequence per prompt (prompts with fewer than two samples add nothing).

    Returns:
        The slope, or None when no prompt's lengths vary.
    """
    numerator = denominator = 0.0
    for r, n in zip(rewards, lengths, strict=True):
        r, n = _as_float64(r), _as_float64(n)
        if r.shape != n.shape:
            raise ValueError(f"within_prompt_length_slope: {r.size} rewards but {n.size} lengths for one prompt.")
        if r.size < 2:
            continue
        dn = n - n.mean()
        numerator += float(np.dot(dn, r - r.mean()))
        denominator += float(np.dot(dn, dn))
    return numerator / denominator if denominator > 0 else None
