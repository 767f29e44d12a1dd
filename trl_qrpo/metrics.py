"""Small statistics used in logged metrics and evaluations (no trainer imports)."""

from __future__ import annotations

import math
import warnings

import torch


def spearman_correlation(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two 1-D tensors (average ranks for ties, `scipy.stats.spearmanr`).

    None when it is undefined: fewer than 2 values, or either input constant.
    """
    from scipy.stats import spearmanr

    x = torch.as_tensor(x).detach().reshape(-1).to("cpu", torch.float64).numpy()
    y = torch.as_tensor(y).detach().reshape(-1).to("cpu", torch.float64).numpy()
    if x.size < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConstantInputWarning: answered with None below
        rho = float(spearmanr(x, y).statistic)
    return rho if math.isfinite(rho) else None
