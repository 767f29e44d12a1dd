"""`score_dataset`: rewards of the dataset's completions and of every reference completion (the second step of the
pre-computation). The scorers themselves are in :mod:`.scorers` (and :mod:`.vllm_scorer`), built by
:func:`~.backends.make_scorer`.
"""

from __future__ import annotations

import math

from ..columns import COMPLETION_COLUMNS, COMPLETION_REWARD_COLUMNS, PROMPT, REF_COMPLETIONS, REF_REWARDS
from .backends import make_scorer
from .chunks import ChunkedTask, ShardPlan, run_chunked
from .config import ScoreConfig
from .io import ensure_prompt_column, logger, path_str, rows_range
from .scorers import RewardFunctionError, reward_function_kwarg_columns, reward_names


def _check_completion(value, column: str, row: int, position: int | None) -> None:
    where = f"column '{column}', row {row}" + (f", reference {position}" if position is not None else "")
    if isinstance(value, str):
        return
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return
    raise ValueError(
        f"{where}: expected a completion (a string, or a list of {{'role', 'content'}} messages), got {value!r}. "
        "Fix or drop this row before scoring."
    )


def score_dataset(dataset, args: ScoreConfig, reward_model=None, reward_funcs=None, processing_class=None):
    """Score the dataset's completions and every reference completion.

    Writes `reward` for `completion`, `chosen_reward` / `rejected_reward` for `chosen` / `rejected`, and
    `ref_rewards` (one float per entry of `ref_completions`), overwriting existing columns of those names (with a
    warning). The reward of a completion is the weighted sum of the reward model's score and the reward functions'
    values; a function may return `None` for completions it does not apply to (skipped in the sum, as in
    GRPOTrainer), but a completion with no reward at all is an error naming its column and row.

    Args:
        dataset ([`~datasets.Dataset`]):
            Dataset with `prompt` and at least one of `completion`, `chosen`, `rejected`, `ref_completions`.
        args ([`ScoreConfig`]):
            The reward ([`RewardArguments`]: reward model and/or reward functions, weights, reward-model options),
            the columns to score, the backend, and the resumable run ([`ShardArguments`]). Reward functions have
            TRL's signature `f(prompts, completions, **kwargs) -> list[float | None]`; they receive the row's other
            columns as keyword lists, `completion_ids` when a policy tokenizer is given, and `trainer_state=None`,
            `log_extra`, `log_metric` (no-ops) like in GRPO.
        reward_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            Overrides `args.reward_model_name_or_path`, e.g. with a loaded model.
        reward_funcs (`list[Callable | str]`, *optional*):
            Overrides `args.reward_funcs`, e.g. with Python callables.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or `str`, *optional*):
            The policy's tokenizer (default: `args.tokenizer_name_or_path`), to pass `completion_ids` to reward
            functions.

    Returns:
        [`~datasets.Dataset`]: the shard's rows with the reward columns.
    """
    reward_model = path_str(reward_model if reward_model is not None else args.reward_model_name_or_path)
    reward_funcs = reward_funcs if reward_funcs is not None else args.reward_funcs
    processing_class = processing_class if processing_class is not None else args.tokenizer_name_or_path
    if reward_model is None and not reward_funcs:
        raise ValueError("Give a reward: --reward_model_name_or_path and/or --reward_funcs.")
    output_dir, columns = path_str(args.output_dir), args.columns
    dataset = ensure_prompt_column(dataset)
    available = [c for c in (*COMPLETION_COLUMNS, REF_COMPLETIONS) if c in dataset.column_names]
    if columns is None:
        columns = available
    unknown = [c for c in columns if c not in available]
    if unknown or not columns:
        raise ValueError(
            f"Nothing to score in column(s) {unknown or list(columns)}: the dataset has {dataset.column_names}. Score "
            "'completion', 'chosen', 'rejected' or 'ref_completions' (run `trl qrpo generate` to get references)."
        )
    outputs = {c: REF_REWARDS if c == REF_COMPLETIONS else COMPLETION_REWARD_COLUMNS[c] for c in columns}
    for output in outputs.values():
        if output in dataset.column_names:
            logger.warning(f"Column '{output}' exists and is replaced by the new rewards.")
            dataset = dataset.remove_columns(output)
    kwarg_columns = reward_function_kwarg_columns(dataset.column_names)
    ref_counts = (
        [len(x) if x is not None else 0 for x in dataset[REF_COMPLETIONS]] if REF_COMPLETIONS in columns else None
    )
    units = [
        (len(columns) - (REF_COMPLETIONS in columns)) + (ref_counts[i] if ref_counts else 0)
        for i in range(len(dataset))
    ]

    params = {
        "rewards": reward_names(reward_model, reward_funcs),
        "reward_weights": list(args.reward_weights) if args.reward_weights else None,
        "columns": list(columns),
        "max_length": args.reward_max_length,
        "dtype": args.reward_dtype,
        "label_index": args.reward_label_index,
        "batch_size": args.reward_batch_size,
        "device": args.device,
        "backend": args.backend,
    }
    plan = ShardPlan(len(dataset), args.chunk_size, args.num_shards, args.shard_index)
    scorer = {}

    def process_chunk(rows, indices, progress):
        if "scorer" not in scorer:
            scorer["scorer"] = make_scorer(args, reward_model, reward_funcs, processing_class, backend=args.backend)
            logger.info(f"Reward = {' + '.join(scorer['scorer'].description)}")
        data = rows.to_dict()
        prompts, completions, where = [], [], []
        for pos, row in enumerate(indices):
            for column in columns:
                value = data[column][pos]
                if column == REF_COMPLETIONS:
                    if not isinstance(value, list) or not value:
                        raise ValueError(
                            f"Column '{REF_COMPLETIONS}', row {row}: expected a non-empty list of reference "
                            f"completions, got {value!r}. Regenerate this row or drop it before scoring."
                        )
                    for j, ref in enumerate(value):
                        _check_completion(ref, column, row, j)
                        prompts.append(data[PROMPT][pos]), completions.append(ref), where.append((pos, column, j))
                else:
                    _check_completion(value, column, row, None)
                    prompts.append(data[PROMPT][pos]), completions.append(value), where.append((pos, column, None))
        kwargs = {c: [data[c][pos] for pos, _, _ in where] for c in kwarg_columns}
        try:
            rewards = scorer["scorer"](prompts, completions, progress=progress, **kwargs)
        except RewardFunctionError as error:
            rows = sorted({indices[where[i][0]] for i in error.positions})
            raise ValueError(error.describe(f"rows {rows_range(rows)} (0-based positions in the dataset)")) from None
        out = {outputs[c]: [[] if c == REF_COMPLETIONS else None for _ in indices] for c in columns}
        for (pos, column, j), reward in zip(where, rewards, strict=True):
            if math.isnan(reward):
                detail = f", reference {j}" if j is not None else ""
                raise ValueError(
                    f"Column '{column}', row {indices[pos]}{detail}: every reward returned None/NaN for this "
                    "completion. Make at least one reward apply to every completion, or drop the row."
                )
            if j is None:
                out[outputs[column]][pos] = reward
            else:
                out[outputs[column]][pos].append(reward)
        for name, values in out.items():
            rows = rows.add_column(name, values)
        return rows

    task = ChunkedTask(
        "score",
        params,
        soft_params=("batch_size", "device", "backend"),
        units_per_row=units,
        unit="completion",
        desc="Scoring",
    )
    result = run_chunked(dataset, process_chunk, task, plan, output_dir)
    rm = scorer.get("scorer")
    if rm is not None:
        truncated = sum(getattr(s, "num_truncated", 0) for s in rm.scorers)
        if truncated:
            logger.warning(
                f"{truncated} texts were longer than reward_max_length={args.reward_max_length} and were truncated for "
                "the reward model."
            )
    return result
