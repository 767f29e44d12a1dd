"""Small statistics used in logged metrics and evaluations (no trainer imports)."""

from __future__ import annotations

import torch


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, tied values sharing their average rank."""
    x = x.reshape(-1)
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    # Start index of each run of equal values, and the run each sorted element belongs to.
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    run_id = torch.cumsum(new_run.long(), 0) - 1
    starts = torch.nonzero(new_run).reshape(-1)
    ends = torch.cat([starts[1:], torch.tensor([len(x)], device=x.device)])
    mean_rank = (starts + ends + 1).double() / 2.0  # average of 1-based ranks start+1..end
    ranks = torch.empty(len(x), dtype=torch.float64, device=x.device)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman_correlation(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two 1-D tensors (average ranks for ties); None when undefined."""
    if x.numel() < 2:
        return None
    rx, ry = average_ranks(x.detach().float().cpu()), average_ranks(y.detach().float().cpu())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    if denom == 0:
        return None
    return float((rx * ry).sum() / denom)
