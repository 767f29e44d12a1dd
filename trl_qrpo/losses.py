"""Quantile rewards, QRPO regression targets and the QRPO loss, as plain tensor functions.

Everything here takes tensors and returns tensors (torch only; no trainer, no TRL), so each piece is testable without
a model:

- :func:`quantile_rewards`: ``q_hat = #{ref rewards <= reward} / n`` for a whole dataset at once (sort each row's
  reference rewards once, then ``searchsorted``), with the paper's ``<=`` ties, mid-rank or randomised tie-breaking,
  leave-one-out for completions that are themselves among the references, and ``num_ref_rewards``.
- :func:`qrpo_targets`: ``f(clamp(q_hat)) - beta * log Z``, with the continuous (paper) or the exact discrete
  partition function, a scalar beta or one beta per completion (length-normalised beta).
- :func:`qrpo_loss`: the pointwise regression ``(target - beta * logratio)^2`` (or ``|.|``), per example.
- :func:`rebel_loss`: the REBEL baseline over pairs, for comparisons.

The derivations (the estimator's law, the partition functions, the target and the loss) are in docs/math.md.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .transforms import Transform, get_transform

__all__ = [
    "LOSS_TYPES",
    "PARTITION_MODES",
    "TIES",
    "QuantileResult",
    "qrpo_loss",
    "qrpo_targets",
    "quantile_rewards",
    "rebel_loss",
]

TIES = ("le", "midrank", "random")
PARTITION_MODES = ("continuous", "discrete")
LOSS_TYPES = ("mse", "mae")
BASELINE_LOSS_TYPES = ("rebel",)  # pairwise baselines, for comparisons on the same data and trainer


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


class QuantileResult(NamedTuple):
    """What :func:`quantile_rewards` returns.

    Attributes:
        quantiles (`torch.Tensor`): float64, shaped like ``rewards``: each reward's quantile among its row's
            references (``count / n``, see :func:`quantile_rewards` for the count).
        num_refs (`torch.Tensor`): int64, shaped like ``rewards``: the number of references each quantile was taken
            over (the row's non-NaN references, less one where leave-one-out applied).
        constant_rows (`torch.Tensor`): bool ``[N]``: the rows whose (at least two) references are all equal, e.g. for
            a caller that warns once over many calls.
    """

    quantiles: torch.Tensor
    num_refs: torch.Tensor
    constant_rows: torch.Tensor


def quantile_rewards(
    rewards: torch.Tensor,
    ref_rewards: torch.Tensor,
    ties: str = "le",
    num_ref_rewards: int | None = None,
    in_ref_rewards: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    warn_constant: bool = True,
    row_ids=None,
) -> QuantileResult:
    """Quantile of each reward among its row's reference rewards (docs/math.md, "The quantile estimator").

    Args:
        rewards (`torch.Tensor`): ``[N]``, or ``[N, k]`` for k completions sharing a row's references (e.g. chosen
            and rejected).
        ref_rewards (`torch.Tensor`): ``[N, n]``. Shorter lists are padded with NaN (ignored).
        ties (`str`, defaults to `"le"`): ``"le"``: ``#{S <= r} / n`` (the paper's); ``"midrank"``:
            ``(#{S < r} + #{S = r} / 2) / n``; ``"random"``: ``(#{S < r} + U{0..#{S = r}}) / n``, which restores the
            exact discrete uniform law when rewards tie (binary or quantised rewards).
        num_ref_rewards (`int`, *optional*): use only the first n reference rewards of each row.
        in_ref_rewards (`torch.Tensor`, *optional*): boolean, shaped like ``rewards``: the completion is itself one of
            the row's (first ``num_ref_rewards``) references and its own reward is in the list. One equal entry is
            then left out (leave-one-out), so the quantile is taken among the other references.
        generator (`torch.Generator`, *optional*): randomness for ``ties="random"``.
        warn_constant (`bool`): warn with the count of rows whose reference rewards are all equal, naming some.
        row_ids (sequence of `int`, *optional*): the rows' numbers in their data set, to name them in warnings and
            errors (default: their positions in ``rewards``).

    Returns:
        A :class:`QuantileResult` ``(quantiles, num_refs, constant_rows)``.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}.")
    rewards = torch.as_tensor(rewards)
    ref = torch.as_tensor(ref_rewards)
    # Compare in the inputs' common floating dtype: widening is exact, so no copy of a float32 matrix is needed.
    dtype = torch.promote_types(rewards.dtype, ref.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    rewards, ref = rewards.to(dtype), ref.to(dtype)
    squeeze = rewards.dim() == 1
    if squeeze:
        rewards = rewards[:, None]
    if ref.dim() != 2 or rewards.dim() != 2 or ref.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"Expected rewards [N] or [N, k] and ref_rewards [N, n]; got {tuple(rewards.shape)} and "
            f"{tuple(ref.shape)}."
        )
    if num_ref_rewards is not None:
        if num_ref_rewards < 1:
            raise ValueError(f"num_ref_rewards must be at least 1, got {num_ref_rewards}.")
        if ref.shape[1] < num_ref_rewards or torch.isnan(ref[:, :num_ref_rewards]).any():
            raise ValueError(f"Some rows have fewer than num_ref_rewards={num_ref_rewards} reference rewards.")
        ref = ref[:, :num_ref_rewards]

    below, equal, n, constant_rows = _rank_counts(rewards, ref)
    row_ids = torch.arange(rewards.shape[0]) if row_ids is None else torch.as_tensor(row_ids)
    if (n == 0).any():
        raise ValueError("Every row needs at least one reference reward.")
    n = n[:, None].expand_as(rewards).clone()

    if in_ref_rewards is not None:
        self_mask = torch.as_tensor(in_ref_rewards, dtype=torch.bool)
        if squeeze:
            self_mask = self_mask.reshape(-1, 1)
        self_mask = self_mask.expand_as(rewards)
        missing = self_mask & (equal == 0)
        if missing.any():
            row = int(missing.any(dim=1).nonzero()[0])
            raise ValueError(
                f"Row {int(row_ids[row])} is marked as one of its own references, but no reference reward equals its "
                f"reward {float(rewards[row][missing[row]][0])}."
            )
        equal = equal - self_mask.long()
        n = n - self_mask.long()
        if (self_mask & (n == 0)).any():
            raise ValueError("Leave-one-out needs at least 2 reference rewards for rows that are their own reference.")

    if ties == "le":
        count = (below + equal).double()
    elif ties == "midrank":
        count = below.double() + 0.5 * equal.double()
    else:
        u = torch.rand(equal.shape, generator=generator, dtype=torch.float64)
        count = (below + torch.floor(u * (equal + 1).double()).long()).double()
    q = count / n.double()

    if warn_constant and constant_rows.any():
        warnings.warn(constant_references_message(row_ids[constant_rows], ref.shape[0]), stacklevel=2)
    if squeeze:
        q, n = q[:, 0], n[:, 0]
    return QuantileResult(q, n, constant_rows)


def constant_references_message(rows, total: int, limit: int = 5) -> str:
    """The warning for rows whose reference rewards are all equal, naming the first ``limit`` of them."""
    rows = [int(r) for r in rows]
    shown = ", ".join(str(r) for r in rows[:limit]) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")
    return (
        f"{len(rows)} of {total} rows have reference rewards that are all equal (rows {shown}): their quantiles are "
        "0 or 1 (or 1/2 with mid-rank ties) and break the uniformity the partition function relies on. "
        "Consider ties='random', more reference completions, or a finer reward."
    )


_CHUNK_ROWS = 1 << 16


def _rank_counts(rewards: torch.Tensor, ref: torch.Tensor):
    """#{S < r}, #{S = r} per reward, the number of (non-NaN) references per row and the rows whose refs are equal.

    Vectorised over all rows, in chunks to bound memory. With few completions per row (k) a comparison pass, O(n k)
    per row, beats sorting; with many (e.g. every reference scored against the others) each row's references are
    sorted once and the k rewards located by ``searchsorted``, O((n + k) log n).
    """
    N, n_max = ref.shape
    k = rewards.shape[1]
    below = torch.empty(rewards.shape, dtype=torch.long)
    equal = torch.empty(rewards.shape, dtype=torch.long)
    count = torch.empty(N, dtype=torch.long)
    constant = torch.zeros(N, dtype=torch.bool)
    use_sort = k > 4 and k * n_max > (n_max + k) * max(1, n_max.bit_length())
    # One pass over the matrix: NaN padding (or inf - inf) anywhere sends every chunk through the masked path.
    has_nan = bool(torch.isnan(ref.sum()))
    for start in range(0, N, _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        chunk, values = ref[rows], rewards[rows]
        if has_nan:
            valid = ~torch.isnan(chunk)
            count[rows] = valid.sum(dim=1, dtype=torch.int32)
        else:
            count[rows] = n_max
        if use_sort:
            filled = torch.where(valid, chunk, torch.full_like(chunk, float("inf"))) if has_nan else chunk
            sorted_ref, _ = torch.sort(filled, dim=1)
            lo = torch.searchsorted(sorted_ref, values.contiguous(), right=False)
            hi = torch.searchsorted(sorted_ref, values.contiguous(), right=True)
            below[rows], equal[rows] = lo, hi - lo
        else:
            for j in range(k):
                value = values[:, j : j + 1]
                # bool.sum with an int32 accumulator: ~10x faster than count_nonzero, which casts to int64 first.
                lo = (chunk < value).sum(dim=1, dtype=torch.int32)
                below[rows, j] = lo
                equal[rows, j] = (chunk <= value).sum(dim=1, dtype=torch.int32) - lo
        if n_max > 1:
            if has_nan:
                inf = torch.full_like(chunk, float("inf"))
                lowest = torch.where(valid, chunk, inf).amin(dim=1)
                highest = torch.where(valid, chunk, -inf).amax(dim=1)
            else:
                lowest, highest = chunk.amin(dim=1), chunk.amax(dim=1)
            constant[rows] = (lowest == highest) & (count[rows] > 1)
    return below, equal, count, constant


def _group_log_partition(transform: Transform, beta: torch.Tensor, n, includes_self, partition_mode: str):
    """log Z per element, computed once per distinct (beta, n, includes_self) group (host-side float64).

    Groups are few (one beta, or one per completion length; a handful of reference counts), so the closed forms or
    the quadrature run a handful of times, whatever the number of rows.
    """
    flat_beta = beta.reshape(-1)
    if partition_mode == "continuous" and flat_beta.numel() and bool(flat_beta.min() == flat_beta.max()):
        value = transform.log_partition(float(flat_beta[0]))  # one beta: one group, no sort
        if torch.is_tensor(value) and value.dim() > 0:  # per-prompt transform: one value per row
            return torch.broadcast_to(value.to(torch.float64).reshape(-1, *([1] * (beta.dim() - 1))), beta.shape)
        return torch.full_like(beta, float(value))
    _, code = torch.unique(flat_beta, return_inverse=True)
    if partition_mode == "discrete":
        flat_n = n.reshape(-1).long()
        code = (code * (int(flat_n.max()) + 1) + flat_n) * 2 + includes_self.reshape(-1).long()
    groups, inverse = torch.unique(code, return_inverse=True)
    # Rows index the per-prompt parameters of transforms such as scaled-normal-icdf.
    rows = torch.arange(beta.shape[0]).repeat_interleave(beta[0].numel() if beta.dim() > 1 else 1)
    flat = torch.empty_like(flat_beta)
    order = torch.argsort(inverse, stable=True)
    bounds = torch.searchsorted(inverse[order], torch.arange(len(groups) + 1))
    for g in range(len(groups)):
        idx = order[bounds[g] : bounds[g + 1]]
        first = int(idx[0])
        b = float(flat_beta[first])
        if partition_mode == "continuous":
            value = transform.log_partition(b)
        else:
            value = transform.discrete_log_partition(
                b, int(n.reshape(-1)[first]), bool(includes_self.reshape(-1)[first])
            )
        if torch.is_tensor(value) and value.dim() > 0:  # per-prompt transform: index by row
            flat[idx] = value.to(torch.float64)[rows[idx]]
        else:
            flat[idx] = float(value)
    return flat.reshape(beta.shape)


def qrpo_targets(
    quantiles: torch.Tensor,
    transform: str | Transform = "identity",
    beta: float | torch.Tensor = 1e-3,
    num_refs: int | torch.Tensor | None = None,
    partition_mode: str = "continuous",
    includes_self: torch.Tensor | bool = False,
):
    """Regression targets ``f(clamp(q)) - beta * log Z`` for the QRPO loss.

    Args:
        quantiles (`torch.Tensor`): ``[N]`` or ``[N, k]`` quantile rewards.
        transform (`str` or `Transform`): a registered name or a Transform (per-prompt transforms index rows along
            dim 0).
        beta (`float` or `torch.Tensor`): the KL coefficient, or one value per element (length-normalised beta).
        num_refs (`int` or `torch.Tensor`, *optional*): number of reference rewards behind each quantile; used to
            clamp quantiles for transforms infinite at an endpoint (to ``[1/n, (n-1)/n]``) and by the discrete
            partition function. ``None`` for precomputed quantiles of unknown resolution (continuous mode only).
        partition_mode (`str`): ``"continuous"`` (the paper's, ``log Z`` of ``f(U)``), or ``"discrete"`` (the exact
            partition function of ``f(clamp(q_hat))`` for n references; docs/math.md, "The discrete partition
            function").
        includes_self (`bool` or `torch.Tensor`): for the discrete mode, whether the completion's own reward was
            counted among its references (support ``{1..n}`` instead of ``{0..n}``).

    Returns:
        ``(targets, beta_log_z)``: float64 tensors shaped like ``quantiles``.
    """
    if partition_mode not in PARTITION_MODES:
        raise ValueError(f"partition_mode must be one of {PARTITION_MODES}, got {partition_mode!r}.")
    transform = get_transform(transform)
    q = _as_float64(quantiles)
    beta_t = torch.broadcast_to(_as_float64(beta), q.shape).clone()
    if not (beta_t > 0).all():
        raise ValueError("beta must be positive.")
    if num_refs is None:
        if partition_mode == "discrete":
            raise ValueError(
                "The discrete partition mode needs the number of reference rewards behind each quantile: set "
                "num_ref_rewards, or give ref_rewards instead of precomputed quantiles."
            )
        n_t = None
    else:
        n_t = torch.broadcast_to(torch.as_tensor(num_refs, dtype=torch.long), q.shape)
        if (n_t < 1).any():
            raise ValueError("num_refs must be at least 1.")
    if transform.clamp_high and n_t is not None and (n_t < 2).any():
        raise ValueError(
            f"The {transform.name!r} transform is infinite at both ends and clamps quantiles to [1/n, (n-1)/n], "
            "which needs at least 2 reference rewards per prompt."
        )
    values = transform(transform.clamp(q, n_t))
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).reshape(q.shape[0], -1).any(dim=1).nonzero()[0].item()
        raise ValueError(
            f"The {transform.name!r} transform is not finite for the quantile of row {bad} ({q[bad].tolist()}). "
            "Quantiles at 0 or 1 need clamping: give ref_rewards or set num_ref_rewards so that the number of "
            "reference rewards is known."
        )
    incl = torch.broadcast_to(torch.as_tensor(includes_self, dtype=torch.bool), q.shape)
    log_z = _group_log_partition(transform, beta_t, n_t, incl, partition_mode)
    beta_log_z = beta_t * log_z
    return values.double() - beta_log_z, beta_log_z


def qrpo_loss(
    logratios: torch.Tensor,
    targets: torch.Tensor,
    beta: float | torch.Tensor,
    loss_type: str = "mse",
    completion_lengths: torch.Tensor | None = None,
    normalize_by_length: bool = False,
) -> torch.Tensor:
    """Per-example QRPO loss: ``(target - beta * logratio)^2`` ("mse") or ``|target - beta * logratio|`` ("mae").

    Args:
        logratios (`torch.Tensor`): ``log pi(y|x) - log pi_ref(y|x)`` summed over the completion tokens, ``[B]``.
        targets (`torch.Tensor`): ``f(q) - beta * log Z``, ``[B]`` (see :func:`qrpo_targets`).
        beta (`float` or `torch.Tensor`): the KL coefficient, or one per example (length-normalised beta).
        loss_type (`str`): ``"mse"`` (the paper's default) or ``"mae"``.
        completion_lengths (`torch.Tensor`, *optional*): completion token counts, needed by ``normalize_by_length``.
        normalize_by_length (`bool`): divide each example's loss by its completion token count.

    Returns:
        ``[B]`` losses in the dtype of ``logratios`` (float32 at least).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    dtype = torch.promote_types(logratios.dtype, torch.float32)
    logratios = logratios.to(dtype)
    targets = torch.as_tensor(targets, device=logratios.device).to(dtype)
    beta = torch.as_tensor(beta, device=logratios.device).to(dtype)
    residual = targets - beta * logratios
    losses = residual.square() if loss_type == "mse" else residual.abs()
    if normalize_by_length:
        if completion_lengths is None:
            raise ValueError("normalize_by_length needs completion_lengths.")
        losses = losses / torch.as_tensor(completion_lengths, device=losses.device).to(dtype).clamp(min=1)
    return losses


def rebel_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """REBEL (Gao et al., 2024) over pairs: ``((r_c - r_r) / beta - (logratio_c - logratio_r))^2``, per pair.

    A baseline for comparisons: it regresses the difference of log-ratios onto the reward difference, so it needs two
    completions per prompt; QRPO regresses each completion alone.
    """
    dtype = torch.promote_types(chosen_logratios.dtype, torch.float32)
    reward_margin = (torch.as_tensor(chosen_rewards) - torch.as_tensor(rejected_rewards)).to(
        chosen_logratios.device, dtype
    )
    return (reward_margin / beta - (chosen_logratios.to(dtype) - rejected_logratios.to(dtype))).square()
