"""QRPO data preparation: layouts and aliases, validation, quantiles and sides, target lengths, targets.

Two input layouts are accepted (documented in the README; column names in :mod:`trl_qrpo.columns`):

- pointwise: ``prompt``, ``completion``, ``reward``, ``ref_rewards`` (list of the reference completions' rewards);
- paired: ``prompt``, ``chosen``, ``rejected``, ``chosen_reward``, ``rejected_reward``, ``ref_rewards``.

A precomputed quantile (``quantile``; ``chosen_quantile`` / ``rejected_quantile``) can stand instead of
``ref_rewards``. Rows whose completion is itself one of the references carry ``in_ref_rewards`` (or
``chosen_in_ref_rewards`` / ``rejected_in_ref_rewards``) = True.

After :func:`quantile_batch`, every row holds a list of k completions (k = 1 for pointwise data and for the
"chosen", "rejected" and "random" sample selectors, k = 2 for "both") with one quantile, reward and reference count
each. Each completion is its own regression example; the two sides of a pair stay in the same row only so that a
batch of B rows means B pairs, as in DPO, and the chosen/rejected accuracy can be logged.

:func:`quantile_batch` and :func:`target_batch` take and return Arrow tables (``datasets.map`` on a dataset with
``.with_format("arrow")``, map-style or iterable): the reward columns and the reference-reward lists are read as
numpy arrays straight from Arrow (one ``[rows, n]`` matrix when the lists have equal lengths, NaN-padded when not)
and the new columns are written as Arrow arrays, never as Python lists.

Each step takes its options as one frozen object built from the QRPOConfig: :class:`QuantileOptions` for
:func:`quantile_batch` / :func:`map_quantiles` (references, ties, sides, self-inclusion, seed) and
:class:`TargetOptions` for :func:`target_batch` / :func:`map_targets` (transform, beta, partition mode, length
options), ``QuantileOptions.from_args(config)`` and ``TargetOptions.from_args(config, transform)``.

Transforms that depend on the prompt (``Transform.per_prompt``) get their parameters through ``Transform.fit`` (the
training set's reference rewards, :func:`fit_transform`) and ``Transform.for_prompts`` (a batch's): this module
keeps the ``ref_rewards`` column until targets are computed for them, and knows no transform's formula.

Bad input is refused before training with the column, the rows and the fix: missing, non-finite or non-numeric
rewards, rewards stored as text (refused, with the cast that fixes it: a text column is most often a CSV read
without types, and a silent conversion would hide a ``"high"`` further down), empty prompts, empty reference lists.
Nothing here imports a trainer or TRL.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .columns import (
    ALIASES,
    BETA,
    BETA_LOG_Z,
    CHOSEN,
    COMPLETION,
    COMPLETION_IDS,
    COMPLETIONS,
    IN_REFS,
    NUM_REFS,
    PAIRED_SIDES,
    POINTWISE_SIDES,
    PROMPT,
    PROMPT_IDS,
    QUANTILE,
    REF_COMPLETIONS,
    REF_REWARDS,
    REJECTED,
    REWARD,
    SAMPLED_IDS,
    SEQUENCE_REF_LOGPS,
    TARGET,
    ids_column,
    in_refs_column,
    quantile_column,
    ref_logp_column,
    reward_column,
)
from .losses import constant_references_message, qrpo_targets, quantile_rewards
from .transforms import Transform, get_transform

POINTWISE = "pointwise"
PAIRED = "paired"
SAMPLE_SELECTORS = ("both", "chosen", "rejected", "random")
SELF_INCLUSION = ("leave_one_out", "keep")
BATCH_SIZE = 10_000  # rows per batch of the quantile and target maps (random ties and sides are seeded per batch)

# Columns made by preparation that the target step consumes (the prepared dataset keeps the tokenized ids, reward,
# quantile and the targets).
INTERMEDIATE_COLUMNS = (COMPLETIONS, NUM_REFS, IN_REFS)

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
    has_sampled_ids: bool = False  # some side carries the token ids it was sampled as (`completion_ids`, ...)
    has_ref_logps: bool = False  # every side carries pi_ref's log-probability (`ref_logp`, `chosen_ref_logp`, ...)

    @property
    def sides(self) -> tuple[str, ...]:
        return POINTWISE_SIDES if self.kind == POINTWISE else PAIRED_SIDES


@dataclass(frozen=True)
class QuantileOptions:
    """The options of the quantile step, :func:`quantile_batch` (the QRPOConfig fields of the same names).

    Args:
        num_ref_rewards (`int`, *optional*): use the first n reference rewards of every row (all when None).
        ties (`str`): ``"le"``, ``"midrank"`` or ``"random"`` (see :func:`trl_qrpo.losses.quantile_rewards`).
        sample_selector (`str`): which sides of a pair train: ``"both"``, ``"chosen"``, ``"rejected"``, ``"random"``.
        self_inclusion (`str`): ``"leave_one_out"`` or ``"keep"`` for completions that are their own reference.
        seed (`int`): seeds random ties and random sides, per batch of ``BATCH_SIZE`` rows.
    """

    num_ref_rewards: int | None = None
    ties: str = "le"
    sample_selector: str = "both"
    self_inclusion: str = "leave_one_out"
    seed: int = 42

    @classmethod
    def from_args(cls, args) -> QuantileOptions:
        """From a QRPOConfig (or anything with these attributes)."""
        return cls(args.num_ref_rewards, args.ties, args.sample_selector, args.self_inclusion, args.seed)


@dataclass(frozen=True)
class TargetOptions:
    """The options of the target step, :func:`target_batch` (the QRPOConfig fields of the same names).

    Args:
        transform (`Transform`): the resolved transform f; a per-prompt transform must be fitted
            (:func:`fit_transform`) before :func:`target_batch` uses it.
        beta (`float`): the KL coefficient.
        partition_mode (`str`): ``"continuous"`` or ``"discrete"`` (see :func:`trl_qrpo.losses.qrpo_targets`).
        normalize_beta_by_length (`bool`): divide beta by the completion tokens the loss scores (then the targets need
            the tokenized lengths, ``max_length`` and ``truncation_mode``).
        max_length (`int`, *optional*): the collator's truncation length (None: no truncation).
        truncation_mode (`str`): ``"keep_start"`` or ``"keep_end"``, as the collator truncates.
        num_ref_rewards (`int`, *optional*): the reference rewards a per-prompt transform reads per row (all when
            None), as for the quantiles.
    """

    transform: Transform = field(default_factory=lambda: get_transform("identity"))
    beta: float = 1e-3
    partition_mode: str = "continuous"
    normalize_beta_by_length: bool = False
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    num_ref_rewards: int | None = None

    @classmethod
    def from_args(cls, args, transform: Transform | None = None) -> TargetOptions:
        """From a QRPOConfig (or anything with these attributes); ``transform`` defaults to the config's own,
        resolved with :func:`trl_qrpo.transforms.get_transform` (pass it to reuse a resolved or fitted one)."""
        if transform is None:
            transform = get_transform(args.transform, **(getattr(args, "transform_kwargs", None) or {}))
        return cls(
            transform,
            args.beta,
            args.partition_mode,
            args.normalize_beta_by_length,
            args.max_length,
            args.truncation_mode,
            args.num_ref_rewards,
        )

    @property
    def in_quantile_pass(self) -> bool:
        """Whether the targets can be computed with the quantiles (:func:`quantile_batch`): they depend neither on
        token counts (``normalize_beta_by_length``) nor on the data set's statistics (a per-prompt transform)."""
        return not (self.normalize_beta_by_length or self.transform.per_prompt)


def consumed_columns(layout: Layout) -> set[str]:
    """Input columns the quantile step replaces by the prepared columns."""
    consumed = {REF_REWARDS, *layout.sides}
    for side in layout.sides:
        consumed |= {reward_column(side), quantile_column(side), in_refs_column(side)}
        consumed |= {ids_column(side), ref_logp_column(side)}
    return consumed


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


def is_reference_layout(column_names: list[str]) -> bool:
    """Whether a dataset is the output of `generate` + `score` only: reference completions and their rewards, no
    completion of its own (training then takes every reference as a pointwise row; see the trainer)."""
    cols = set(column_names)
    return {REF_COMPLETIONS, REF_REWARDS} <= cols and COMPLETION not in cols and not {CHOSEN, REJECTED} <= cols


def detect_layout(column_names: list[str]) -> Layout:
    """Pointwise or paired, with or without reference rewards / precomputed quantiles (canonical names)."""
    cols = set(column_names)
    if CHOSEN in cols and REJECTED in cols:
        kind = PAIRED
    elif COMPLETION in cols:
        kind = POINTWISE
    else:
        fix = (
            f"Score its '{REF_COMPLETIONS}' with `trl qrpo score` first: training then takes every reference "
            "completion as a pointwise row."
            if REF_COMPLETIONS in cols
            else "Add completions with their rewards, or sample them with `trl qrpo generate` and score them with "
            "`trl qrpo score` (training takes that output as it is; `trl qrpo build-offpolicy` makes pairs of it)."
        )
        raise ValueError(
            f"QRPO needs either a '{COMPLETION}' column (pointwise data) or '{CHOSEN}' and '{REJECTED}' columns "
            f"(paired data); the dataset has {sorted(cols)}. {fix}"
        )
    layout = Layout(kind, REF_REWARDS in cols, False, False)
    needed = []
    quantile_cols = [quantile_column(s) for s in layout.sides]
    layout.has_quantile = all(c in cols for c in quantile_cols)
    layout.has_in_refs = any(in_refs_column(s) in cols for s in layout.sides)
    if not layout.has_ref_rewards and not layout.has_quantile:
        raise ValueError(f"The dataset has no '{REF_REWARDS}' column (nor {quantile_cols}). " + _FIX_REF)
    if layout.has_ref_rewards:
        needed += [reward_column(s) for s in layout.sides]
    missing = [c for c in needed if c not in cols]
    if missing:
        aliases = {c: ALIASES.get(c, ()) for c in missing}
        raise ValueError(
            f"Missing reward column(s) {missing} (accepted aliases: {aliases}). Score the completions with "
            "`trl qrpo score` or add the rewards."
        )
    if PROMPT not in cols and kind == POINTWISE:
        raise ValueError(f"Pointwise QRPO data needs a '{PROMPT}' column next to '{COMPLETION}'.")
    layout.has_sampled_ids = any(ids_column(s) in cols for s in layout.sides)
    logp_cols = [ref_logp_column(s) for s in layout.sides]
    present = [c for c in logp_cols if c in cols]
    if present and len(present) < len(logp_cols):
        raise ValueError(
            f"The dataset has {present} but not {[c for c in logp_cols if c not in cols]}: reference log-probs are "
            "used only when every completion has one. Compute them all with `trl qrpo ref-logps`, or remove "
            f"{present} to use a reference model."
        )
    layout.has_ref_logps = bool(present)
    return layout


# ---------------------------------------------------------------------------------------------------------------------
# Reading and validating Arrow columns
# ---------------------------------------------------------------------------------------------------------------------


def _rows_message(rows, limit: int = 5) -> str:
    rows = [int(r) for r in rows]
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f"; and {len(rows) - limit} more" if len(rows) > limit else ""
    # 0-based, as datasets indexes rows: the row of a .jsonl file's line 3 is row 2.
    return f"row{'s' if len(rows) > 1 else ''} {shown} (0-based{more})"


def _array(batch: pa.Table, column: str) -> pa.Array:
    values = batch.column(column)
    if isinstance(values, pa.ChunkedArray):  # one chunk (a batch's slice): no copy
        return values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    return values


def _is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _is_number(type_: pa.DataType) -> bool:
    return (
        pa.types.is_integer(type_)
        or pa.types.is_floating(type_)
        or pa.types.is_boolean(type_)
        or pa.types.is_decimal(type_)
        or pa.types.is_null(type_)
    )


def _refuse_text(column: str, values: list, rows: np.ndarray, what: str):
    """Rewards stored as text: name the non-numbers if there are any, else give the cast that converts the column."""

    def is_number(v):
        try:
            float(v)
            return True
        except (TypeError, ValueError):
            return False

    def first_bad(v):  # the value itself, or the first non-number of a list
        items = v if isinstance(v, list) else [v]
        return next((x for x in items if x is not None and not is_number(x)), None)

    bad = [i for i, v in enumerate(values) if first_bad(v) is not None]
    if bad:
        raise ValueError(
            f"Column '{column}', {_rows_message(rows[bad])}: the {what} {first_bad(values[bad[0]])!r} is not a "
            "number. Rewards must be numbers: map these values to numbers (e.g. a rating scale to floats) or drop "
            "these rows before training."
        )
    example = next((i for i, v in enumerate(values) if v is not None), 0)
    shown = values[example][:3] if isinstance(values[example], list) else values[example]
    feature = "Value('float64')" if what == "reward" else "List(Value('float64'))"
    raise ValueError(
        f"Column '{column}' holds its {what}s as text (e.g. {shown!r} in {_rows_message(rows[[example]])}), "
        "not numbers. QRPO does not convert them silently: cast the column first, e.g. "
        f"`dataset = dataset.cast_column('{column}', {feature})` (from datasets import Value, List)."
    )


def float_column(batch: pa.Table, column: str, rows: np.ndarray, what: str = "reward") -> np.ndarray:
    """A numeric column as float64 numpy (None -> NaN); text and other non-numeric columns are refused."""
    values = _array(batch, column)
    if _is_text(values.type):
        _refuse_text(column, values.to_pylist(), rows, what)
    if not _is_number(values.type):
        raise ValueError(
            f"Column '{column}' holds {values.type} values; a {what} must be one number per row. Fix the column "
            "before training."
        )
    return values.cast(pa.float64()).to_numpy(zero_copy_only=False)


def finite_column(batch: pa.Table, column: str, rows: np.ndarray) -> np.ndarray:
    out = float_column(batch, column, rows)
    bad = ~np.isfinite(out)
    if bad.any():
        value = batch.column(column)[int(np.argmax(bad))].as_py()
        raise ValueError(
            f"Column '{column}', {_rows_message(rows[bad])}: the reward is missing or not finite ({value!r}). "
            "Rewards must be finite numbers: re-score these completions or drop these rows before training."
        )
    return out


def list_lengths(values: pa.Array) -> np.ndarray:
    """Lengths of a list column (a missing list counts 0), int64 numpy."""
    return pc.fill_null(pc.list_value_length(values), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def ref_matrix(batch: pa.Table, rows: np.ndarray, num_ref_rewards: int | None, column: str = REF_REWARDS):
    """The reference rewards as a float64 ``[N, n]`` matrix (NaN-padded), validated, and the list lengths ``[N]``.

    Equal-length lists are read as one reshaped array from Arrow (no Python objects); ragged lists are scattered into
    a NaN-padded matrix, also vectorised.
    """
    values = _array(batch, column)
    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)) and not pa.types.is_fixed_size_list(
        values.type
    ):
        raise ValueError(
            f"Column '{column}' holds {values.type} values; it needs one list of reference rewards per row. "
            + _FIX_REF
        )
    lengths = list_lengths(values)
    empty = lengths == 0
    if empty.any():
        raise ValueError(f"Column '{column}', {_rows_message(rows[empty])}: the list is empty. " + _FIX_REF)
    if num_ref_rewards is not None:
        short = lengths < num_ref_rewards
        if short.any():
            raise ValueError(
                f"Column '{column}', {_rows_message(rows[short])}: the list has {int(lengths[short][0])} "
                f"reward(s), fewer than num_ref_rewards={num_ref_rewards}. Lower num_ref_rewards, or generate and "
                "score more reference completions for these prompts."
            )
    flat = values.flatten()
    if _is_text(flat.type):
        _refuse_text(column, values.to_pylist(), rows, "reference reward")  # names rows, not list positions
    if not _is_number(flat.type):
        raise ValueError(f"Column '{column}' holds lists of {flat.type}; reference rewards must be numbers.")
    flat = flat.cast(pa.float64()).to_numpy(zero_copy_only=False)
    n_rows = len(lengths)
    width = int(lengths.max()) if num_ref_rewards is None else num_ref_rewards
    if n_rows and (lengths == lengths[0]).all():
        matrix = flat.reshape(n_rows, int(lengths[0]))[:, :width]
        bad = ~np.isfinite(matrix.sum(axis=1))  # one pass, no [N, n] mask; an overflowing sum is re-checked below
        if bad.any():
            bad[bad] = ~np.isfinite(matrix[bad]).all(axis=1)
    else:
        matrix = np.full((n_rows, width), np.nan)
        filled = np.arange(width)[None, :] < lengths[:, None]  # row-major, as the flat values
        if width < lengths.max():  # num_ref_rewards cuts some lists: keep each list's first `width` values
            position = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            flat = flat[position < width]
        matrix[filled] = flat
        bad = (~np.isfinite(matrix) & filled).any(axis=1)
    if bad.any():
        raise ValueError(
            f"Column '{column}', {_rows_message(rows[bad])}: the list holds a missing or non-finite reward. "
            "Re-score these reference completions or drop these rows before training."
        )
    return matrix, lengths


def check_prompts(batch: pa.Table, rows: np.ndarray):
    """Refuse missing and empty prompts (an empty string or an empty list of messages)."""
    if PROMPT not in batch.column_names:
        return
    values = _array(batch, PROMPT)
    if _is_text(values.type):
        empty = pc.fill_null(pc.equal(pc.utf8_length(values), 0), True)
    elif pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        empty = pc.equal(pc.fill_null(pc.list_value_length(values), 0), 0)
    else:
        return
    empty = empty.to_numpy(zero_copy_only=False)
    if empty.any():
        raise ValueError(
            f"Column '{PROMPT}', {_rows_message(rows[empty])}: the prompt is empty. A QRPO target is the quantile of "
            "a reward among the reference rewards of the same prompt, and the first token of a sequence has no "
            "log-probability: fill in the prompt these completions answer, or drop these rows before training."
        )


def check_references(table: pa.Table, num_ref_rewards: int | None, dataset_name: str = "train"):
    """Warn once per data set: reference lists of different lengths, and rows whose references are all equal.

    ``table`` holds the whole data set's ``ref_rewards`` column (Arrow). Errors are left to :func:`quantile_batch`.
    """
    values = _array(table, REF_REWARDS)
    lengths = list_lengths(values)
    if not len(lengths) or (lengths == 0).any():
        return
    low, high = int(lengths.min()), int(lengths.max())
    if num_ref_rewards is None and low != high:
        differ = int((lengths != np.bincount(lengths).argmax()).sum())
        warnings.warn(
            f"The {dataset_name} dataset's reference-reward lists have different lengths ({low} to {high} rewards; "
            f"{differ} of {len(lengths)} rows differ from the most common length): each quantile is taken over its "
            f"own row's references, so rows have different resolutions. Set num_ref_rewards (e.g. {low}) to use the "
            "first n rewards of every row.",
            stacklevel=2,
        )
    if num_ref_rewards is not None and low < num_ref_rewards:
        return  # refused with its message by the quantile step
    if low == high:  # one reshaped view of the Arrow buffer: two reductions, no copy
        flat = values.flatten()
        if not (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)):
            return
        matrix = flat.to_numpy(zero_copy_only=False).reshape(len(lengths), low)[:, : num_ref_rewards or low]
        lowest, highest = matrix.min(axis=1), matrix.max(axis=1)
    else:
        try:
            matrix, lengths = ref_matrix(table, np.arange(len(lengths)), num_ref_rewards)
        except ValueError:
            return  # refused with its message by the quantile step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lowest, highest = np.nanmin(matrix, axis=1), np.nanmax(matrix, axis=1)
    if matrix.shape[1] < 2:
        return
    constant = (lowest == highest) & (np.minimum(lengths, matrix.shape[1]) > 1)
    if constant.any():
        warnings.warn(
            f"The {dataset_name} dataset: " + constant_references_message(np.flatnonzero(constant), len(constant)),
            stacklevel=2,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Quantiles and sides
# ---------------------------------------------------------------------------------------------------------------------


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory (read-only Arrow buffers included: nothing here writes to it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def _list_array(values: np.ndarray | pa.Array, k: int, n_rows: int) -> pa.Array:
    offsets = pa.array(np.arange(0, (n_rows + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values if isinstance(values, pa.Array) else pa.array(values.ravel()))


def _completions(batch: pa.Table, sides: tuple[str, ...], keep: np.ndarray) -> pa.Array:
    """Per row the completions of the kept sides (``keep`` is ``[N, k]`` side indices), as a list column."""
    arrays = [_array(batch, side) for side in sides]
    arrays = [a if a.type == arrays[0].type else a.cast(arrays[0].type) for a in arrays]
    stacked = arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)
    n_rows, k = keep.shape
    order = (keep * n_rows + np.arange(n_rows)[:, None]).ravel()
    return _list_array(stacked.take(pa.array(order)), k, n_rows)


def _per_side(batch: pa.Table, columns: list[str], keep: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Like :func:`_completions` for an optional per-side column (a side without the column gives nulls)."""
    n_rows, k = keep.shape
    arrays = [
        _array(batch, c).cast(type_) if c in batch.column_names else pa.nulls(n_rows, type=type_) for c in columns
    ]
    stacked = arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)
    order = (keep * n_rows + np.arange(n_rows)[:, None]).ravel()
    return _list_array(stacked.take(pa.array(order)), k, n_rows)


def quantile_batch(
    batch: pa.Table,
    indices: list[int],
    layout: Layout,
    options: QuantileOptions,
    keep_ref_rewards: bool = False,
    warn: bool = True,
    targets: TargetOptions | None = None,
) -> pa.Table:
    """Validate a batch (an Arrow table), compute each completion's quantile and select the sides that stay.

    Returns the batch with its side, reward, quantile and reference columns replaced by ``completions`` (k
    completions), ``reward``, ``quantile``, ``num_refs`` and ``in_refs``, each a list of k values (chosen first for
    pairs). ``keep_ref_rewards`` keeps ``ref_rewards`` for a per-prompt transform's ``for_prompts``; ``warn`` warns
    about rows whose references are all equal (map-style data sets are checked once by :func:`check_references`).

    ``targets``: when the targets depend neither on token counts nor on the data set's statistics
    (``targets.in_quantile_pass``), compute them in this same pass (``target``, ``beta``, ``beta_log_z`` instead of
    ``num_refs`` and ``in_refs``), saving the separate :func:`target_batch` pass.
    """
    if targets is not None and not targets.in_quantile_pass:
        raise ValueError(
            "Targets with normalize_beta_by_length or a per-prompt transform need token counts or the data set's "
            "statistics: compute them with target_batch / map_targets after tokenization."
        )
    rows = np.asarray(indices, dtype=np.int64)
    n_rows = len(rows)
    sides = layout.sides
    num_ref_rewards, ties, sample_selector = options.num_ref_rewards, options.ties, options.sample_selector
    self_inclusion, seed = options.self_inclusion, options.seed
    check_prompts(batch, rows)
    # Randomness (random ties, random side) is seeded by the batch's first row, so it does not depend on the order
    # in which batches are processed.
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(rows[0]) if n_rows else int(seed))

    in_refs = np.zeros((n_rows, len(sides)), dtype=bool)
    if layout.has_in_refs:
        for j, side in enumerate(sides):
            if in_refs_column(side) in batch.column_names:
                marks = _array(batch, in_refs_column(side))
                in_refs[:, j] = pc.fill_null(marks.cast(pa.bool_()), False).to_numpy(zero_copy_only=False)

    if layout.has_ref_rewards:
        rewards = np.stack([finite_column(batch, reward_column(s), rows) for s in sides], axis=1)
        ref, _ = ref_matrix(batch, rows, num_ref_rewards)
        try:
            quantiles, num_refs, _ = quantile_rewards(
                torch.from_numpy(rewards),
                _as_tensor(ref),
                ties=ties,
                num_ref_rewards=num_ref_rewards,
                in_ref_rewards=torch.from_numpy(in_refs) if self_inclusion == "leave_one_out" else None,
                generator=generator,
                warn_constant=warn,
                row_ids=rows,
            )
        except ValueError as e:
            raise ValueError(f"Column '{REF_REWARDS}' (rows {int(rows[0])}-{int(rows[-1])}): {e}") from e
        quantiles, num_refs = quantiles.numpy(), num_refs.numpy()
    else:
        quantiles = np.stack([finite_column(batch, quantile_column(s), rows) for s in sides], axis=1)
        out_of_range = (quantiles < 0) | (quantiles > 1)
        bad_rows = out_of_range.any(axis=1)
        if bad_rows.any():
            column = quantile_column(sides[int(np.argmax(out_of_range[bad_rows][0]))])
            raise ValueError(
                f"Column '{column}', {_rows_message(rows[bad_rows])}: quantiles must lie in [0, 1]. Give "
                f"{REF_REWARDS} instead, or fix the quantile computation."
            )
        rewards = np.full_like(quantiles, np.nan)
        for j, side in enumerate(sides):
            if reward_column(side) in batch.column_names:
                rewards[:, j] = float_column(batch, reward_column(side), rows)
        num_refs = np.full(quantiles.shape, -1 if num_ref_rewards is None else num_ref_rewards, dtype=np.int64)

    # Sample selector: which sides of a pair become training examples.
    if layout.kind == PAIRED and sample_selector != "both":
        if sample_selector == "random":
            pick = torch.randint(0, 2, (n_rows,), generator=generator).numpy()
        else:
            pick = np.full(n_rows, 0 if sample_selector == "chosen" else 1)
        keep = pick[:, None]
        rewards, quantiles, num_refs, in_refs = (
            np.take_along_axis(a, keep, axis=1) for a in (rewards, quantiles, num_refs, in_refs)
        )
    else:
        keep = np.broadcast_to(np.arange(len(sides)), (n_rows, len(sides)))
    k = keep.shape[1]
    new = {
        COMPLETIONS: _completions(batch, sides, keep),
        REWARD: _list_array(rewards.astype(np.float64), k, n_rows),
        QUANTILE: _list_array(quantiles.astype(np.float64), k, n_rows),
        NUM_REFS: _list_array(num_refs.astype(np.int64), k, n_rows),
        IN_REFS: _list_array(in_refs & (self_inclusion == "keep"), k, n_rows),
    }
    if layout.has_sampled_ids:
        new[SAMPLED_IDS] = _per_side(batch, [ids_column(side) for side in sides], keep, pa.list_(pa.int64()))
    if layout.has_ref_logps:
        for side in sides:
            logps = float_column(batch, ref_logp_column(side), rows, what="reference log-probability")
            bad = ~np.isfinite(logps) | (logps > 0)
            if bad.any():
                raise ValueError(
                    f"Column '{ref_logp_column(side)}', {_rows_message(rows[bad])}: the reference log-probability is "
                    "missing, not finite or positive. Recompute it (`trl qrpo ref-logps`), or remove the column to "
                    "use a reference model."
                )
        new[SEQUENCE_REF_LOGPS] = _per_side(batch, [ref_logp_column(side) for side in sides], keep, pa.float64())
    if targets is not None:
        del new[NUM_REFS], new[IN_REFS]
        beta_t = torch.full(quantiles.shape, float(targets.beta), dtype=torch.float64)
        values = _targets(
            torch.from_numpy(quantiles.astype(np.float64)),
            torch.from_numpy(num_refs.astype(np.int64)),
            torch.from_numpy(in_refs & (self_inclusion == "keep")),
            beta_t,
            targets.transform,
            targets.partition_mode,
        )
        new.update({name: _list_array(v, k, n_rows) for name, v in values.items()})
    drop = consumed_columns(layout) - ({REF_REWARDS} if keep_ref_rewards else set())
    out = batch.drop_columns([c for c in batch.column_names if c in drop or c in new])
    for name, values in new.items():
        out = out.append_column(name, values)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Lengths and targets
# ---------------------------------------------------------------------------------------------------------------------


def _broadcast_lengths(prompt_lens, completion_lens):
    p, c = np.asarray(prompt_lens, dtype=np.int64), np.asarray(completion_lens, dtype=np.int64)
    return (p[:, None] if c.ndim == 2 else p), c


def kept_completion_tokens(prompt_lens, completion_lens, max_length: int | None, truncation_mode: str = "keep_start"):
    """Completion tokens left after the collator truncates prompt + completion to ``max_length`` (numpy, broadcast)."""
    p, c = _broadcast_lengths(prompt_lens, completion_lens)
    if max_length is None:
        return c.copy()
    kept = np.minimum(p + c, max_length)
    return np.minimum(c, kept) if truncation_mode == "keep_end" else np.clip(kept - p, 0, None)


def scored_completion_tokens(
    prompt_lens, completion_lens, max_length: int | None, truncation_mode: str = "keep_start"
):
    """Completion tokens whose log-probability the loss sums: ``completion_mask[:, 1:].sum()`` of the collator.

    The kept completion tokens (see :func:`kept_completion_tokens`), less one when the kept sequence starts with a
    completion token, which has no log-probability (an empty tokenized prompt, or ``keep_end`` cutting the whole
    prompt and part of the completion away).
    """
    p, c = _broadcast_lengths(prompt_lens, completion_lens)
    kept_c = kept_completion_tokens(prompt_lens, completion_lens, max_length, truncation_mode)
    if truncation_mode == "keep_end" and max_length is not None:
        starts_in_completion = np.minimum(p + c, max_length) <= c  # no prompt token kept
    else:
        starts_in_completion = p == 0
    return kept_c - ((kept_c > 0) & starts_in_completion)


def token_lengths(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Prompt lengths ``[N]`` and completion lengths ``[N, k]`` of a tokenized table, from Arrow offsets."""
    prompt_lens = list_lengths(_array(batch, PROMPT_IDS))
    completions = _array(batch, COMPLETION_IDS)
    per_row = list_lengths(completions)
    k = int(per_row[0]) if len(per_row) else 1
    completion_lens = list_lengths(completions.flatten()).reshape(len(per_row), k)
    return prompt_lens, completion_lens


def _per_completion(batch: pa.Table, column: str, dtype) -> np.ndarray:
    values = _array(batch, column)
    n_rows = len(values)
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    return flat.reshape(n_rows, -1) if n_rows else flat.reshape(0, 1)


def fit_transform(transform: Transform, ref_table: pa.Table, num_ref_rewards: int | None) -> Transform:
    """``transform.fit`` on a data set's reference-reward matrix (``ref_table`` holds its ``ref_rewards``)."""
    if not transform.per_prompt:
        return transform
    matrix, _ = ref_matrix(ref_table, np.arange(ref_table.num_rows), num_ref_rewards)
    return transform.fit(_as_tensor(matrix))


def target_batch(batch: pa.Table, options: TargetOptions) -> pa.Table:
    """Regression targets for a prepared (Arrow) batch: ``target``, ``beta`` and ``beta_log_z`` per completion.

    With ``options.normalize_beta_by_length``, beta is divided by the number of completion tokens the loss scores
    (see :func:`scored_completion_tokens`). A per-prompt transform (already fitted) is specialised to the batch's rows
    with ``transform.for_prompts(ref_rewards)``.
    """
    transform = options.transform
    q = torch.from_numpy(_per_completion(batch, QUANTILE, np.float64))
    n = torch.from_numpy(_per_completion(batch, NUM_REFS, np.int64))
    incl = torch.from_numpy(_per_completion(batch, IN_REFS, bool))
    n_rows, k = q.shape
    if options.normalize_beta_by_length:
        prompt_lens, completion_lens = token_lengths(batch)
        scored = scored_completion_tokens(prompt_lens, completion_lens, options.max_length, options.truncation_mode)
        beta_t = options.beta / torch.from_numpy(scored.astype(np.float64)).clamp(min=1)
    else:
        beta_t = torch.full(q.shape, float(options.beta), dtype=torch.float64)
    if transform.per_prompt:
        if REF_REWARDS not in batch.column_names:
            raise ValueError(
                f"The {transform.name!r} transform depends on each prompt's reference rewards: give "
                f"'{REF_REWARDS}', not precomputed quantiles."
            )
        ref, _ = ref_matrix(batch, np.arange(n_rows), options.num_ref_rewards)
        transform = transform.for_prompts(_as_tensor(ref))
    out = batch.drop_columns([c for c in batch.column_names if c in (*INTERMEDIATE_COLUMNS, REF_REWARDS)])
    for name, values in _targets(q, n, incl, beta_t, transform, options.partition_mode).items():
        out = out.append_column(name, _list_array(values, k, n_rows))
    return out


def _targets(q, n, incl, beta_t, transform, partition_mode) -> dict[str, np.ndarray]:
    """``target``, ``beta`` and ``beta_log_z`` ``[N, k]`` float64 (``n < 0``: precomputed quantiles, n unknown)."""
    num_refs = None if (n < 0).any() else n
    targets, beta_log_z = qrpo_targets(q, transform, beta_t, num_refs, partition_mode, incl)
    return {TARGET: targets.numpy(), BETA: beta_t.numpy(), BETA_LOG_Z: beta_log_z.numpy()}


# ---------------------------------------------------------------------------------------------------------------------
# The two dataset steps, as the trainer runs them
# ---------------------------------------------------------------------------------------------------------------------


def _map_arrow(dataset, function, fn_kwargs: dict, **map_kwargs):
    """`dataset.map(function, batched=True)` with Arrow batches in and out (Python format after)."""
    mapped = dataset.with_format("arrow").map(
        function, batched=True, batch_size=BATCH_SIZE, fn_kwargs=fn_kwargs, **map_kwargs
    )
    return mapped.with_format(None)


def map_quantiles(
    dataset,
    layout: Layout,
    options: QuantileOptions,
    *,
    keep_ref_rewards: bool = False,
    warn: bool = True,
    targets: TargetOptions | None = None,
    **map_kwargs,
):
    """:func:`quantile_batch` over a map-style or iterable dataset, Arrow batches in and out (Python format after)."""
    fn_kwargs = {
        "layout": layout,
        "options": options,
        "keep_ref_rewards": keep_ref_rewards,
        "warn": warn,
        "targets": targets,
    }
    return _map_arrow(dataset, quantile_batch, fn_kwargs, with_indices=True, **map_kwargs)


def map_targets(dataset, options: TargetOptions, **map_kwargs):
    """:func:`target_batch` over a prepared dataset (the transform already fitted), Arrow batches in and out."""
    return _map_arrow(dataset, target_batch, {"options": options}, **map_kwargs)
