"""Statistics of the powered matched-KL comparison of training methods.

Every trained policy (a "run": one method, one beta, one seed) was evaluated on the same T held-out test prompts
(`row_index` 0..T-1), several samples per prompt. Each sample record carries its `reward`, its `num_tokens` and, for a
policy, its `logratio` (log pi/pi_ref of the sample, whose mean over samples estimates KL(pi || pi_ref)).

A method traces a reward-KL curve through its betas: one point per beta, at (mean KL, mean reward), each the mean over
the beta's seeds of the run's prompt-averaged per-prompt means. Two methods are compared at equal KL: the difference
of their curves, linearly interpolated between points (never extrapolated), at each KL of a grid inside the range
both curves cover (`matched_kl_grid`).

The uncertainty comes from a bootstrap over test prompts, paired: one resample of the prompts is applied to every
method, beta and seed at once, so the prompt-to-prompt variation shared by the methods (hard prompts are hard for
all) cancels in the difference; the KL of each point is resampled along with its reward. Seeds are not resampled:
they enter as the average that defines each point (their spread is reported separately as standard errors).

`length_controlled_rewards` removes the part of a reward explained by length, with the slope of reward on length
fitted within prompts on the reference model's own samples, so that methods that lengthen their answers are
compared at equal length.

Pure numpy; no torch, no trainer.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from trl_qrpo.metrics import within_prompt_length_slope

KL_KEY = "logratio"
_DRAW_CHUNK = 256  # bootstrap draws resampled at once (bounds the [draws, prompts] count matrix's memory)


def per_prompt_means(records: list[dict], num_prompts: int, key: str) -> np.ndarray:
    """The mean of `key` over each prompt's samples.

    Args:
        records: sample records, each with `row_index` (int in 0..num_prompts-1) and `key`.
        num_prompts: T, the number of test prompts.
        key: the record field to average (`reward`, `logratio`, `num_tokens`, ...).

    Returns:
        float64 array [num_prompts]: entry p is the mean of `key` over the records of row_index p.

    Raises:
        ValueError: a prompt has no sample (the message names its row_index), or a row_index is out of range.
    """
    rows = np.fromiter((r["row_index"] for r in records), dtype=np.int64, count=len(records))
    values = np.fromiter((r[key] for r in records), dtype=np.float64, count=len(records))
    if rows.size and (rows.min() < 0 or rows.max() >= num_prompts):
        bad = int(rows[(rows < 0) | (rows >= num_prompts)][0])
        raise ValueError(f"per_prompt_means: row_index {bad} is outside 0..{num_prompts - 1}.")
    counts = np.bincount(rows, minlength=num_prompts)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(
            f"per_prompt_means: no sample for row_index {int(missing[0])}"
            + (f" (and {missing.size - 1} other prompts)" if missing.size > 1 else "")
            + f" of the {num_prompts} prompts ({key})."
        )
    return np.bincount(rows, weights=values, minlength=num_prompts) / counts


def length_controlled_rewards(records: list[dict], reference_records: list[dict]) -> np.ndarray:
    """Rewards with the effect of length removed: `reward - slope * (num_tokens - mean reference length of the prompt)`.

    `slope` is the within-prompt slope of reward on length (`within_prompt_length_slope`), fitted on the reference
    model's samples grouped by `row_index`; the mean reference length is that of the record's own prompt. A sample as
    long as the reference's average answer to its prompt keeps its reward.

    Args:
        records: the samples to correct, each with `row_index`, `reward`, `num_tokens`.
        reference_records: the reference policy's samples (`row_index`, `reward`, `num_tokens`); may pool several
            seeds.

    Returns:
        float64 array [len(records)], in the order of `records`. The raw rewards when the slope is None (no
        prompt's reference lengths vary).

    Raises:
        ValueError: a record's prompt has no reference sample (only checked when a slope exists).
    """
    rewards = np.array([r["reward"] for r in records], dtype=np.float64)
    by_row_rewards, by_row_lengths = defaultdict(list), defaultdict(list)
    for r in reference_records:
        by_row_rewards[r["row_index"]].append(r["reward"])
        by_row_lengths[r["row_index"]].append(r["num_tokens"])
    rows = sorted(by_row_rewards)
    slope = within_prompt_length_slope([by_row_rewards[i] for i in rows], [by_row_lengths[i] for i in rows])
    if slope is None:
        return rewards
    mean_length = {i: float(np.mean(by_row_lengths[i])) for i in rows}
    missing = sorted({r["row_index"] for r in records} - mean_length.keys())
    if missing:
        raise ValueError(f"length_controlled_rewards: no reference sample for row_index {missing[0]}.")
    centered = np.array([r["num_tokens"] - mean_length[r["row_index"]] for r in records], dtype=np.float64)
    return rewards - slope * centered


def _curves_at(kls: np.ndarray, rewards: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Vectorised `curve_at_kl`: curves [D, J] (D curves of J points, any order) read at each KL of `grid` [G].

    Returns [D, G], NaN where a KL is outside a curve's [min, max] KL. Points of equal KL: the one sorted last among
    them is used to the right of that KL, the first to the left (no averaging; ties have no width).
    """
    kls, rewards, grid = np.atleast_2d(kls), np.atleast_2d(rewards), np.asarray(grid, dtype=np.float64)
    order = np.argsort(kls, axis=1, kind="stable")
    x, y = np.take_along_axis(kls, order, axis=1), np.take_along_axis(rewards, order, axis=1)
    g = grid[None, :]
    inside = (g >= x[:, :1]) & (g <= x[:, -1:])
    if x.shape[1] == 1:
        return np.where(inside, np.broadcast_to(y, inside.shape), np.nan)
    # Segment j: x[j] <= g <= x[j + 1], j = (number of points <= g) - 1, clipped so that g == max uses the last one.
    j = np.clip((x[:, None, :] <= g[:, :, None]).sum(axis=-1) - 1, 0, x.shape[1] - 2)
    x0, x1 = np.take_along_axis(x, j, axis=1), np.take_along_axis(x, j + 1, axis=1)
    y0, y1 = np.take_along_axis(y, j, axis=1), np.take_along_axis(y, j + 1, axis=1)
    width = x1 - x0
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(width > 0, y0 + (g - x0) / np.where(width > 0, width, 1.0) * (y1 - y0), y1)
    return np.where(inside, value, np.nan)


def curve_at_kl(kls, rewards, kl: float) -> float | None:
    """The reward of a method's curve at KL `kl`: linear interpolation between its points sorted by KL.

    Args:
        kls, rewards: the curve's points (one per beta), in any order.
        kl: where to read the curve.

    Returns:
        The interpolated reward; None when `kl` is outside [min, max] of the points' KLs (no extrapolation). With a
        single point: its reward if `kl` equals its KL, else None.
    """
    kls, rewards = np.asarray(kls, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    if kls.shape != rewards.shape or kls.ndim != 1 or kls.size == 0:
        raise ValueError(f"curve_at_kl: need as many KLs as rewards (at least one), got {kls.shape}, {rewards.shape}.")
    value = _curves_at(kls[None, :], rewards[None, :], np.array([kl], dtype=np.float64))[0, 0]
    return None if np.isnan(value) else float(value)


def standard_error(values: np.ndarray) -> float | None:
    """std (ddof=1) / sqrt(n) of per-seed values; None with fewer than two."""
    return float(np.std(values, ddof=1) / math.sqrt(values.size)) if values.size > 1 else None


def matched_kl_grid(points_by_method, step: float = 0.5) -> list[float]:
    """The KLs, multiples of `step`, inside the KL range covered by every method's curve.

    Args:
        points_by_method: {method: [point, ...]} where a point is a dict with "kl" (as returned by
            `matched_kl_bootstrap`) or a number; or a flat list of point dicts with "method" and "kl".
        step: the grid's spacing.

    Returns:
        The multiples k * step with max over methods of min KL <= k * step <= min over methods of max KL, ascending;
        an empty list when the ranges do not overlap (or there are no methods).
    """
    if not isinstance(points_by_method, dict):
        grouped = defaultdict(list)
        for point in points_by_method:
            grouped[point["method"]].append(point)
        points_by_method = grouped
    if step <= 0:
        raise ValueError(f"matched_kl_grid: step must be positive, got {step}.")
    ranges = []
    for points in points_by_method.values():
        kls = [float(p["kl"]) if isinstance(p, dict) else float(p) for p in points]
        if not kls:
            return []
        ranges.append((min(kls), max(kls)))
    if not ranges:
        return []
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if low > high:
        return []
    grid = (k * step for k in range(math.ceil(low / step), math.floor(high / step) + 1))
    return [float(kl) for kl in grid if low <= kl <= high]


def matched_kl_bootstrap(
    runs_by_method: dict[str, list[dict]],
    num_prompts: int,
    kl_grid,
    comparisons: list[tuple[str, str]],
    num_bootstrap: int = 2000,
    seed: int = 0,
    key: str = "reward",
) -> tuple[list[dict], list[dict]]:
    """Compare methods at matched KL, with a bootstrap over test prompts paired across methods.

    Each method's curve has one point per beta: (KL, `key`) = the mean over that beta's seeds of the run's
    per-prompt means (of `logratio`, of `key`) averaged over the prompts. A comparison (A, B) at KL k is
    `curve_at_kl(A, k) - curve_at_kl(B, k)`.

    Bootstrap: `num_bootstrap` resamples of the prompt indices with replacement (`np.random.default_rng(seed)`), the
    same indices for every method, beta and seed of a draw; each draw recomputes every point (KL and `key`) from the
    resampled per-prompt means and reads each comparison's difference at each KL of the grid. A draw in which either
    curve does not cover k (k outside its resampled KL range) is left out for that (comparison, k).

    Args:
        runs_by_method: {method label: [run, ...]}, a run being {"beta", "seed", "records"} (other keys ignored);
            the records carry `row_index`, `logratio` and `key` (for `key="length_controlled_reward"` the caller
            adds that field with `length_controlled_rewards`).
        num_prompts: T; every run must have samples for each of the T prompts.
        kl_grid: the KLs to compare at; None for `matched_kl_grid` of the point estimates (step 0.5).
        comparisons: (label_a, label_b) pairs of keys of `runs_by_method`.
        num_bootstrap: number of bootstrap draws.
        seed: seed of the prompt resampling.
        key: the record field compared (`reward`, `length_controlled_reward`, ...).

    Returns:
        (comparison_rows, points):

        - comparison_rows, one dict per comparison and KL (comparison-major, grid order): "a", "b", "kl",
          "difference" (point estimate from all prompts; None when kl is outside either curve's point-estimate KL
          range, and then "ci_low", "ci_high", "p_a_better" are None and "draws_used" is 0), "ci_low", "ci_high"
          (2.5 and 97.5 percentiles of the difference over the draws in which both curves cover kl), "p_a_better"
          (fraction of those draws with difference > 0), "draws_used" (their number), "num_prompts", "seeds_a",
          "seeds_b" (sorted distinct seeds of each method's runs).
        - points, one dict per method and beta (methods in the order given, betas ascending): "method", "beta",
          "seeds" (sorted list), "kl", "kl_se", `key`, f"{key}_se"; the standard errors are std (ddof=1) / sqrt(n)
          of the per-seed values, None with a single seed.
    """
    for a, b in comparisons:
        for label in (a, b):
            if label not in runs_by_method:
                raise ValueError(f"matched_kl_bootstrap: comparison ({a}, {b}) names unknown method {label!r}.")

    # Per-run per-prompt means, once: [runs, prompts] for the KL and for `key`.
    kl_rows, value_rows = [], []
    curves = {}  # method -> (betas, [indices of each beta's runs])
    points = []
    for method, runs in runs_by_method.items():
        if not runs:
            raise ValueError(f"matched_kl_bootstrap: method {method!r} has no run.")
        by_beta = defaultdict(list)
        for run in runs:
            by_beta[float(run["beta"])].append(run)
        betas, members = sorted(by_beta), []
        for beta in betas:
            seeds = [run["seed"] for run in by_beta[beta]]
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"matched_kl_bootstrap: method {method!r}, beta {beta} repeats a seed: {seeds}.")
            indices = []
            for run in by_beta[beta]:
                indices.append(len(kl_rows))
                kl_rows.append(per_prompt_means(run["records"], num_prompts, KL_KEY))
                value_rows.append(per_prompt_means(run["records"], num_prompts, key))
            members.append(indices)
            per_seed_kl = np.array([kl_rows[i].mean() for i in indices])
            per_seed_value = np.array([value_rows[i].mean() for i in indices])
            points.append(
                {
                    "method": method,
                    "beta": beta,
                    "seeds": sorted(seeds),
                    "kl": float(per_seed_kl.mean()),
                    "kl_se": standard_error(per_seed_kl),
                    key: float(per_seed_value.mean()),
                    f"{key}_se": standard_error(per_seed_value),
                }
            )
        curves[method] = (betas, members)
    kl_matrix, value_matrix = np.stack(kl_rows), np.stack(value_rows)  # [R, T]

    # Seed averaging as a matrix: point (method, beta) = mean of its runs. [P, R]
    point_rows = {}  # method -> slice of point indices
    averaging = np.zeros((len(points), len(kl_rows)))
    p = 0
    for method, (_, members) in curves.items():
        start = p
        for indices in members:
            averaging[p, indices] = 1.0 / len(indices)
            p += 1
        point_rows[method] = slice(start, p)

    if kl_grid is None:
        kl_grid = matched_kl_grid({m: [q for q in points if q["method"] == m] for m in runs_by_method})
    grid = np.asarray(list(kl_grid), dtype=np.float64)

    def differences(counts: np.ndarray) -> np.ndarray:
        """Prompt counts [D, T] -> differences [C, D, G] (NaN where a curve does not cover a KL).

        Sums of counts times values, then / T: a KL identical on every prompt stays exact (a single-point curve)."""
        point_kl = averaging @ (kl_matrix @ counts.T / num_prompts)  # [P, D]
        point_value = averaging @ (value_matrix @ counts.T / num_prompts)
        at = {m: _curves_at(point_kl[s].T, point_value[s].T, grid) for m, s in point_rows.items()}  # method -> [D, G]
        return np.stack([at[a] - at[b] for a, b in comparisons]) if comparisons else np.empty((0, len(counts), 0))

    estimate = differences(np.ones((1, num_prompts)))[:, 0, :]  # [C, G]

    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, num_bootstrap, _DRAW_CHUNK):
        size = min(_DRAW_CHUNK, num_bootstrap - start)
        indices = rng.integers(0, num_prompts, size=(size, num_prompts))
        flat = (indices + num_prompts * np.arange(size)[:, None]).ravel()
        draws.append(differences(np.bincount(flat, minlength=size * num_prompts).reshape(size, num_prompts) * 1.0))
    boot = np.concatenate(draws, axis=1) if draws else np.empty((len(comparisons), 0, grid.size))  # [C, B, G]

    seeds_of = {m: sorted({run["seed"] for run in runs}) for m, runs in runs_by_method.items()}
    rows = []
    for c, (a, b) in enumerate(comparisons):
        for g, kl in enumerate(grid):
            row = {"a": a, "b": b, "kl": float(kl), "difference": None, "ci_low": None, "ci_high": None}
            row.update({"p_a_better": None, "draws_used": 0})
            if not np.isnan(estimate[c, g]):
                row["difference"] = float(estimate[c, g])
                used = boot[c, :, g][~np.isnan(boot[c, :, g])]
                row["draws_used"] = int(used.size)
                if used.size:
                    low, high = np.percentile(used, [2.5, 97.5])
                    row.update(ci_low=float(low), ci_high=float(high), p_a_better=float(np.mean(used > 0)))
            row.update(num_prompts=num_prompts, seeds_a=seeds_of[a], seeds_b=seeds_of[b])
            rows.append(row)
    return rows, points
