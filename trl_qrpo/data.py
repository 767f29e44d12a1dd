"""QRPO data columns: names and aliases, validation, quantiles per batch, pairs -> rows, targets per batch.

Two input layouts are accepted (documented in the README):

- pointwise: ``prompt``, ``completion``, ``reward``, ``ref_rewards`` (list of the reference completions' rewards);
- paired: ``prompt``, ``chosen``, ``rejected``, ``chosen_reward``, ``rejected_reward``, ``ref_rewards``.

A precomputed quantile (``quantile``; ``chosen_quantile`` / ``rejected_quantile``) can stand instead of
``ref_rewards``. Rows whose completion is itself one of the references carry ``in_ref_rewards`` (or
``chosen_in_ref_rewards`` / ``rejected_in_ref_rewards``) = True.

After :func:`quantile_batch`, every row holds a list of k completions (k = 1 for pointwise data and for the
"chosen", "rejected" and "random" sample selectors, k = 2 for "both") with one quantile, reward and reference count
each. Each completion is its own regression example; the two sides of a pair stay in the same row only so that a
batch of B rows means B pairs, as in DPO, and the chosen/rejected accuracy can be logged.

Everything here works on batches (dicts of lists) with numpy/torch inside, so it runs through ``datasets.map`` on
map-style and iterable datasets alike. Nothing here imports a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .losses import qrpo_targets, quantile_rewards
from .transforms import ScaledNormalICDF, Transform

POINTWISE = "pointwise"
PAIRED = "paired"
SAMPLE_SELECTORS = ("both", "chosen", "rejected", "random")
SELF_INCLUSION = ("leave_one_out", "keep")

# canonical name -> accepted aliases (TRL's UltraFeedback data uses score_chosen / score_rejected; the QRPO authors'
# data uses chosen_rewards / rejected_rewards and *_quantile_reward).
ALIASES = {
    "reward": ("score", "rewards"),
    "chosen_reward": ("score_chosen", "chosen_rewards", "chosen_score"),
    "rejected_reward": ("score_rejected", "rejected_rewards", "rejected_score"),
    "ref_rewards": ("reference_rewards",),
    "quantile": ("quantile_reward",),
    "chosen_quantile": ("chosen_quantile_reward", "chosen_quantile_rewards"),
    "rejected_quantile": ("rejected_quantile_reward", "rejected_quantile_rewards"),
}

# Columns made by preparation (the prepared dataset keeps only these and the tokenized ids).
PREPARED_COLUMNS = ("completions", "reward", "quantile", "num_refs", "in_refs", "ref_std")

_FIX_REF = (
    "Every row needs the rewards of the reference model's own completions for its prompt (the `ref_rewards` list, "
    "e.g. from `trl qrpo generate` then `trl qrpo score`), or a precomputed quantile column."
)


@dataclass
class Layout:
    """Which columns a dataset uses, after aliases are resolved."""

    kind: str  # POINTWISE or PAIRED
    has_ref_rewards: bool
    has_quantile: bool
    has_in_refs: bool

    @property
    def sides(self) -> tuple[str, ...]:
        return ("completion",) if self.kind == POINTWISE else ("chosen", "rejected")

    def reward_column(self, side: str) -> str:
        return "reward" if side == "completion" else f"{side}_reward"

    def quantile_column(self, side: str) -> str:
        return "quantile" if side == "completion" else f"{side}_quantile"

    def in_refs_column(self, side: str) -> str:
        return "in_ref_rewards" if side == "completion" else f"{side}_in_ref_rewards"


def alias_renames(column_names: list[str]) -> dict[str, str]:
    """The renames that bring aliased columns to their canonical names.

    A canonical column wins over its aliases (see :func:`shadowed_aliases`: e.g. a data set scored again keeps its
    original `score_chosen` next to the new `chosen_reward`); two aliases of the same column without the canonical
    one are ambiguous and refused.
    """
    renames = {}
    for canonical, aliases in ALIASES.items():
        present = [a for a in aliases if a in column_names]
        if canonical in column_names or not present:
            continue
        if len(present) > 1:
            raise ValueError(
                f"The dataset has several aliases of '{canonical}': {present}. Rename the one to use to "
                f"'{canonical}' (or remove the others)."
            )
        renames[present[0]] = canonical
    return renames


def shadowed_aliases(column_names: list[str]) -> dict[str, str]:
    """Alias columns that are not used because their canonical column is present: alias -> canonical."""
    return {
        alias: canonical
        for canonical, aliases in ALIASES.items()
        if canonical in column_names
        for alias in aliases
        if alias in column_names
    }


def detect_layout(column_names: list[str]) -> Layout:
    """Pointwise or paired, with or without reference rewards / precomputed quantiles (canonical names)."""
    cols = set(column_names)
    if "chosen" in cols and "rejected" in cols:
        kind = PAIRED
    elif "completion" in cols:
        kind = POINTWISE
    else:
        raise ValueError(
            f"QRPO needs either a 'completion' column (pointwise data) or 'chosen' and 'rejected' columns (paired "
            f"data); the dataset has {sorted(cols)}."
        )
    layout = Layout(kind, "ref_rewards" in cols, False, False)
    needed = []
    quantile_cols = [layout.quantile_column(s) for s in layout.sides]
    layout.has_quantile = all(c in cols for c in quantile_cols)
    layout.has_in_refs = any(layout.in_refs_column(s) in cols for s in layout.sides)
    if not layout.has_ref_rewards and not layout.has_quantile:
        raise ValueError(f"The dataset has no 'ref_rewards' column (nor {quantile_cols}). " + _FIX_REF)
    if layout.has_ref_rewards:
        needed += [layout.reward_column(s) for s in layout.sides]
    missing = [c for c in needed if c not in cols]
    if missing:
        aliases = {c: ALIASES.get(c, ()) for c in missing}
        raise ValueError(
            f"Missing reward column(s) {missing} (accepted aliases: {aliases}). Score the completions with "
            "`trl qrpo score` or add the rewards."
        )
    if "prompt" not in cols and kind == POINTWISE:
        raise ValueError("Pointwise QRPO data needs a 'prompt' column next to 'completion'.")
    return layout


def _rows_message(rows: np.ndarray, limit: int = 5) -> str:
    rows = [int(r) for r in rows]
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f" (and {len(rows) - limit} more)" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _float_column(batch: dict, column: str, indices: np.ndarray) -> np.ndarray:
    values = batch[column]
    out = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    bad = ~np.isfinite(out)
    if bad.any():
        raise ValueError(
            f"Column '{column}', {_rows_message(indices[bad])}: the reward is missing or not finite "
            f"({values[int(np.argmax(bad))]!r}). Rewards must be finite numbers: re-score these completions or drop "
            "these rows before training."
        )
    return out


def _ref_matrix(batch: dict, indices: np.ndarray, num_ref_rewards: int | None) -> np.ndarray:
    """The batch's reference rewards as an [N, n] float64 matrix (NaN-padded), validated row by row."""
    lists = batch["ref_rewards"]
    lengths = np.array([0 if v is None else len(v) for v in lists])
    empty = lengths == 0
    if empty.any():
        raise ValueError(f"Column 'ref_rewards', {_rows_message(indices[empty])}: the list is empty. " + _FIX_REF)
    if num_ref_rewards is not None:
        short = lengths < num_ref_rewards
        if short.any():
            raise ValueError(
                f"Column 'ref_rewards', {_rows_message(indices[short])}: the list has {int(lengths[short][0])} "
                f"reward(s), fewer than num_ref_rewards={num_ref_rewards}. Lower num_ref_rewards, or generate and "
                "score more reference completions for these prompts."
            )
    width = int(lengths.max()) if num_ref_rewards is None else num_ref_rewards
    matrix = np.full((len(lists), width), np.nan)
    if (lengths == width).all() or num_ref_rewards is not None:
        try:
            matrix[:] = np.array([v[:width] for v in lists], dtype=np.float64)
        except (TypeError, ValueError):
            matrix[:] = np.array([[np.nan if x is None else x for x in v[:width]] for v in lists], dtype=np.float64)
    else:
        for i, v in enumerate(lists):
            matrix[i, : len(v)] = [np.nan if x is None else x for x in v]
    filled = np.arange(width)[None, :] < np.minimum(lengths, width)[:, None]
    bad = (~np.isfinite(matrix) & filled).any(axis=1)
    if bad.any():
        raise ValueError(
            f"Column 'ref_rewards', {_rows_message(indices[bad])}: the list holds a missing or non-finite reward. "
            "Re-score these reference completions or drop these rows before training."
        )
    return matrix


def quantile_batch(
    batch: dict,
    indices: list[int],
    layout: Layout,
    num_ref_rewards: int | None,
    ties: str,
    sample_selector: str,
    self_inclusion: str,
    seed: int,
) -> dict:
    """Validate a batch, compute each completion's quantile and select the sides that become training examples.

    Returns the new per-row columns: ``completions`` (k completions), ``reward``, ``quantile``, ``num_refs``,
    ``in_refs``, each a list of k values (chosen first for pairs), and ``ref_std`` (the
    standard deviation of the row's reference rewards, for the scaled-normal-icdf transform).
    """
    indices = np.asarray(indices)
    n_rows = len(indices)
    sides = layout.sides
    # Randomness (random ties, random side) is seeded by the batch's first row, so it does not depend on the order
    # in which batches are processed.
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(indices[0]) if n_rows else int(seed))

    in_refs = np.zeros((n_rows, len(sides)), dtype=bool)
    if layout.has_in_refs:
        for j, side in enumerate(sides):
            column = layout.in_refs_column(side)
            if column in batch:
                in_refs[:, j] = [bool(v) for v in batch[column]]

    if layout.has_ref_rewards:
        rewards = np.stack([_float_column(batch, layout.reward_column(s), indices) for s in sides], axis=1)
        ref = _ref_matrix(batch, indices, num_ref_rewards)
        try:
            quantiles, num_refs = quantile_rewards(
                torch.from_numpy(rewards),
                torch.from_numpy(ref),
                ties=ties,
                num_ref_rewards=num_ref_rewards,
                in_ref_rewards=torch.from_numpy(in_refs) if self_inclusion == "leave_one_out" else None,
                generator=generator,
                return_num_refs=True,
            )
        except ValueError as e:
            raise ValueError(f"Column 'ref_rewards' (rows {int(indices[0])}-{int(indices[-1])}): {e}") from e
        quantiles, num_refs = quantiles.numpy(), num_refs.numpy()
        ref_std = ScaledNormalICDF.prompt_scales(torch.from_numpy(ref), mean_std=1.0)[0].numpy()
    else:
        quantiles = np.stack([_float_column(batch, layout.quantile_column(s), indices) for s in sides], axis=1)
        out_of_range = ((quantiles < 0) | (quantiles > 1)).any(axis=1)
        if out_of_range.any():
            column = layout.quantile_column(
                sides[int(np.argmax(((quantiles < 0) | (quantiles > 1))[out_of_range][0]))]
            )
            raise ValueError(
                f"Column '{column}', {_rows_message(indices[out_of_range])}: quantiles must lie in [0, 1]. Give "
                "ref_rewards instead, or fix the quantile computation."
            )
        rewards = np.full_like(quantiles, np.nan)
        for j, side in enumerate(sides):
            if layout.reward_column(side) in batch:
                rewards[:, j] = [np.nan if v is None else v for v in batch[layout.reward_column(side)]]
        num_refs = np.full(quantiles.shape, -1 if num_ref_rewards is None else num_ref_rewards, dtype=np.int64)
        ref_std = np.full(n_rows, np.nan)

    # Sample selector: which sides of a pair become training examples.
    if layout.kind == PAIRED and sample_selector != "both":
        if sample_selector == "random":
            pick = torch.randint(0, 2, (n_rows,), generator=generator).numpy()
        else:
            pick = np.full(n_rows, 0 if sample_selector == "chosen" else 1)
        take = lambda a: a[np.arange(n_rows), pick][:, None]  # noqa: E731
        keep_sides = [[int(p)] for p in pick]  # which side each row keeps
        rewards, quantiles, num_refs, in_refs = take(rewards), take(quantiles), take(num_refs), take(in_refs)
    else:
        keep_sides = [list(range(len(sides)))] * n_rows
    completions = [[batch[sides[s]][i] for s in keep] for i, keep in enumerate(keep_sides)]
    return {
        "completions": completions,
        "reward": rewards.tolist(),
        "quantile": quantiles.tolist(),
        "num_refs": num_refs.tolist(),
        "in_refs": (in_refs & (self_inclusion == "keep")).tolist(),
        "ref_std": ref_std.tolist(),
    }


def effective_completion_length(
    prompt_len: int, completion_len: int, max_length: int | None, truncation_mode: str = "keep_start"
) -> int:
    """Completion tokens left after the collator truncates prompt + completion to ``max_length``."""
    if max_length is None:
        return completion_len
    if truncation_mode == "keep_end":
        return min(completion_len, max_length)
    return max(0, min(completion_len, max_length - prompt_len))


def target_batch(
    batch: dict,
    transform: Transform,
    beta: float,
    partition_mode: str,
    normalize_beta_by_length: bool,
    max_length: int | None,
    truncation_mode: str,
    ref_std_normalizer: float | None,
) -> dict:
    """Regression targets for a tokenized batch: ``target``, ``beta`` and ``beta_log_z`` per completion."""
    k = len(batch["quantile"][0])
    q = torch.tensor(batch["quantile"], dtype=torch.float64).reshape(-1, k)
    n = torch.tensor(batch["num_refs"], dtype=torch.long).reshape(-1, k)
    incl = torch.tensor(batch["in_refs"], dtype=torch.bool).reshape(-1, k)
    if normalize_beta_by_length:
        lengths = torch.tensor(
            [
                [effective_completion_length(len(p), len(c), max_length, truncation_mode) for c in cs]
                for p, cs in zip(batch["prompt_ids"], batch["completion_ids"], strict=True)
            ],
            dtype=torch.float64,
        )
        beta_t = beta / lengths.clamp(min=1)
    else:
        beta_t = torch.full(q.shape, float(beta), dtype=torch.float64)
    if transform.per_prompt:
        std = torch.tensor(batch["ref_std"], dtype=torch.float64)
        if torch.isnan(std).any():
            raise ValueError(f"The {transform.name!r} transform needs ref_rewards (per-prompt reward spread).")
        transform = ScaledNormalICDF(std / ref_std_normalizer)
    num_refs = None if (n < 0).any() else n
    targets, beta_log_z = qrpo_targets(q, transform, beta_t, num_refs, partition_mode, incl)
    return {"target": targets.tolist(), "beta": beta_t.tolist(), "beta_log_z": beta_log_z.tolist()}
