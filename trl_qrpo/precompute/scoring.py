"""Rewards for the dataset's completions and for every reference completion (second step of the pre-computation).

Two kinds of reward, combinable with weights as in GRPOTrainer:

- :class:`RewardModelScorer`: a sequence-classification reward model. Texts are built as GRPOTrainer builds them
  (chat template over prompt + completion for conversational data, prompt + completion otherwise), truncated to
  `max_length` (the count is reported), sorted by length into batches, and scored by the logit of `label_index`.
- :class:`RewardFunctionScorer`: Python functions with TRL's reward-function signature
  `f(prompts, completions, **kwargs) -> list[float | None]`, called with the row's other columns as keyword
  lists (and `completion_ids` when a tokenizer is given), by import path or by TRL's built-in names.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence

from ..columns import (
    COMPLETION_AND_REFERENCE_COLUMNS,
    COMPLETION_IDS,
    COMPLETION_COLUMNS,
    COMPLETION_REWARD_COLUMNS,
    PROMPT,
    REF_COMPLETIONS,
    REF_REWARDS,
)
from .chunks import ChunkedTask, ShardPlan, run_chunked
from .config import ScoreConfig
from .io import ensure_prompt_column, logger, model_name, path_str
from .sampling import load_model, load_tokenizer


def reward_function_kwarg_columns(column_names) -> list[str]:
    """The columns passed to reward functions as keyword lists: all but the completions, references and rewards."""
    return [c for c in column_names if c not in COMPLETION_AND_REFERENCE_COLUMNS]


def _noop(*args, **kwargs) -> None:
    return None


def load_reward_function(spec: str) -> Callable:
    """A reward function from TRL's built-in names (`accuracy_reward`, `think_format_reward`, ...) or an import path.

    Args:
        spec (`str`):
            A name exported by `trl.rewards`, or a dotted path `package.module.function` (the current directory is
            importable, as in TRL's GRPO script).
    """
    import trl.rewards

    if "." not in spec:
        # TRL's ready-made rewards (its `get_*` factories need arguments: wrap them in a module of your own).
        names = sorted(
            n
            for n in getattr(trl.rewards, "__all__", dir(trl.rewards))
            if inspect.isfunction(getattr(trl.rewards, n, None)) and not n.startswith("get_")
        )
        if spec in names:
            return getattr(trl.rewards, spec)
        raise ValueError(
            f"Unknown reward function '{spec}'. Give a TRL reward ({names}) or an import path such as "
            "'my_package.rewards.my_reward'."
        )
    module_name, name = spec.rsplit(".", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"Cannot import module '{module_name}' of reward function '{spec}': {error}") from error
    func = getattr(module, name, None)
    if not callable(func):
        raise ValueError(f"Module '{module_name}' has no callable '{name}' (reward function '{spec}').")
    return func


def completion_texts(prompts: list, completions: list, tokenizer) -> list[str]:
    """Texts a reward model scores, as GRPOTrainer builds them."""
    from trl.data_utils import apply_chat_template, is_conversational

    if prompts and is_conversational({"prompt": prompts[0]}):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The data is conversational but the reward model's tokenizer has no chat template. Set one "
                "(`tokenizer.chat_template = ...`) or give the reward model's own tokenizer."
            )
        return [
            apply_chat_template({"messages": p + c}, tokenizer)["text"]
            for p, c in zip(prompts, completions, strict=True)
        ]
    return [p + c for p, c in zip(prompts, completions, strict=True)]


def reward_model_token_ids(tokenizer, prompts, completions, max_length=None) -> tuple[list[list[int]], int]:
    """A reward model's input ids of each (prompt, completion), the start kept when longer than `max_length`, and
    how many were cut (the same for every backend: transformers and vLLM score the same tokens)."""
    texts = completion_texts(prompts, completions, tokenizer)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max_length is None:
        return ids, 0
    return [x[:max_length] for x in ids], sum(len(x) > max_length for x in ids)


def load_reward_tokenizer(model, args, processing_class=None):
    """The reward model's tokenizer: `processing_class`, else `args.reward_tokenizer_name_or_path`, else the model's."""
    processing_class = processing_class if processing_class is not None else args.reward_tokenizer_name_or_path
    if processing_class is None or isinstance(processing_class, (str, os.PathLike)):
        name = processing_class or (model if isinstance(model, str) else getattr(model, "name_or_path", None))
        processing_class = load_tokenizer(path_str(name), trust_remote_code=args.trust_remote_code)
    if processing_class.pad_token is None:
        processing_class.pad_token = processing_class.eos_token
    return processing_class


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a sequence-classification reward model (transformers).

    Args:
        model (`str` or [`~transformers.PreTrainedModel`]):
            Reward model id/folder, or a loaded `AutoModelForSequenceClassification`.
        args ([`RewardArguments`] with `device` and `trust_remote_code`, e.g. [`ScoreConfig`]):
            `reward_tokenizer_name_or_path` (default: the model's), `reward_max_length` (tokens kept per text, the
            start kept; truncations are counted and reported), `reward_batch_size` (texts per forward pass, sorted by
            length), `reward_dtype` (rewards are returned as float32 either way; a bfloat16 head quantises rewards,
            which creates ties), `reward_label_index` (which logit is the reward), `reward_model_init_kwargs`.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The reward model's tokenizer, overriding `args.reward_tokenizer_name_or_path`.
    """

    def __init__(self, model, args, processing_class=None):
        self.tokenizer = load_reward_tokenizer(model, args, processing_class)
        self.model = load_model(
            model,
            "AutoModelForSequenceClassification",
            dtype=args.reward_dtype,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
            model_init_kwargs=args.reward_model_init_kwargs,
        )
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        num_labels = getattr(self.model.config, "num_labels", 1)
        if not 0 <= args.reward_label_index < num_labels:
            raise ValueError(
                f"reward_label_index={args.reward_label_index} but the reward model has {num_labels} label(s)."
            )
        self.name = os.path.basename(str(getattr(self.model, "name_or_path", "reward_model")).rstrip("/"))
        self.max_length, self.batch_size, self.label_index = (
            args.reward_max_length,
            args.reward_batch_size,
            args.reward_label_index,
        )
        self.num_truncated = 0

    def token_ids(self, prompts, completions) -> list[list[int]]:
        """The reward model's input ids of each (prompt, completion), truncated to `max_length` (counted)."""
        ids, truncated = reward_model_token_ids(self.tokenizer, prompts, completions, self.max_length)
        self.num_truncated += truncated
        return ids

    def __call__(self, prompts, completions, progress=None, **kwargs) -> list[float]:
        import torch
        from trl.trainer.utils import pad

        ids = self.token_ids(prompts, completions)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        rewards = [math.nan] * len(ids)
        device = self.model.device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                tensors = [torch.tensor(ids[i]) for i in batch]
                input_ids = pad(tensors, padding_value=self.tokenizer.pad_token_id, padding_side="right").to(device)
                mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="right").to(device)
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                for i, value in zip(batch, logits[:, self.label_index].float().tolist(), strict=True):
                    rewards[i] = value
                if progress is not None:
                    progress(len(batch))
        return rewards


class RewardFunctionScorer:
    """Scores completions with one reward function (TRL's signature), in batches.

    Args:
        func (`Callable` or `str`):
            The function (sync or async), or its import path / TRL name (see [`load_reward_function`]).
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            When given, completions are tokenised and passed as `completion_ids` (needed by length-based rewards
            such as TRL's `get_soft_overlong_punishment`).
        batch_size (`int`, *optional*, defaults to `64`):
            Completions per call.
    """

    def __init__(self, func, processing_class=None, *, batch_size=64):
        self.func = load_reward_function(func) if isinstance(func, str) else func
        self.name = func if isinstance(func, str) else getattr(func, "__name__", type(func).__name__)
        self.tokenizer, self.batch_size = processing_class, batch_size

    def _completion_ids(self, completions):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, prompts, completions, progress=None, **columns) -> list[float]:
        rewards = []
        for start in range(0, len(prompts), self.batch_size):
            end = min(start + self.batch_size, len(prompts))
            kwargs = {key: values[start:end] for key, values in columns.items()}
            kwargs.update(trainer_state=None, log_extra=_noop, log_metric=_noop)
            if self.tokenizer is not None:
                kwargs[COMPLETION_IDS] = self._completion_ids(completions[start:end])
            output = self.func(prompts=prompts[start:end], completions=completions[start:end], **kwargs)
            if inspect.isawaitable(output):
                output = asyncio.run(output)
            output = list(output)
            if len(output) != end - start:
                raise ValueError(
                    f"The reward function '{self.name}' returned {len(output)} rewards for {end - start} completions. "
                    "It must return one reward (a float, or None when it does not apply) per completion."
                )
            rewards.extend(math.nan if r is None else float(r) for r in output)
            if progress is not None:
                progress(end - start)
        return rewards


class CombinedScorer:
    """Weighted sum of several scorers; `None`/NaN components are skipped per completion (GRPOTrainer's nansum).

    Args:
        scorers (`list`): Scorers called as `scorer(prompts, completions, progress=None, **columns)`.
        weights (`list[float]`, *optional*): One weight per scorer; defaults to 1 each.
    """

    def __init__(self, scorers: list, weights: Sequence[float] | None = None):
        if not scorers:
            raise ValueError("Give a reward model or at least one reward function.")
        weights = [1.0] * len(scorers) if weights is None else [float(w) for w in weights]
        if len(weights) != len(scorers):
            raise ValueError(
                f"{len(weights)} reward weights for {len(scorers)} rewards ({[s.name for s in scorers]}: the reward "
                "model first, then the reward functions in order). Give one weight per reward."
            )
        self.scorers, self.weights = scorers, weights

    def __call__(self, prompts, completions, progress=None, **columns) -> list[float]:
        if len(self.scorers) == 1:
            return self.scorers[0](prompts, completions, progress=progress, **columns)
        parts = [s(prompts, completions, **columns) for s in self.scorers]
        combined = []
        for values in zip(*parts, strict=True):
            present = [w * v for w, v in zip(self.weights, values, strict=True) if not math.isnan(v)]
            combined.append(math.fsum(present) if present else math.nan)
        if progress is not None:
            progress(len(prompts))
        return combined

    @property
    def description(self) -> list[str]:
        return [f"{w} * {s.name}" for s, w in zip(self.scorers, self.weights, strict=True)]


def make_scorer(args, reward_model=None, reward_funcs=None, processing_class=None, backend: str = "transformers"):
    """The weighted reward of `args` ([`RewardArguments`] with `device` and `trust_remote_code`).

    Args:
        args ([`ScoreConfig`] or [`EvaluateConfig`]):
            The reward options.
        reward_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            Overrides `args.reward_model_name_or_path` (e.g. an already-loaded model).
        reward_funcs (`list[Callable | str]`, *optional*):
            Overrides `args.reward_funcs` (callables, import paths or TRL names).
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or `str`, *optional*):
            The policy's tokenizer, to pass `completion_ids` to reward functions.
        backend (`str`, *optional*, defaults to `"transformers"`):
            Backend of the reward model: `"transformers"`, or `"vllm"` (vLLM's pooling runner; `args` then also
            holds the [`VLLMArguments`]).
    """
    reward_model = path_str(reward_model if reward_model is not None else args.reward_model_name_or_path)
    reward_funcs = reward_funcs if reward_funcs is not None else args.reward_funcs
    if isinstance(reward_funcs, str) or callable(reward_funcs):
        reward_funcs = [reward_funcs]
    processing_class = path_str(processing_class)
    if isinstance(processing_class, str):
        processing_class = load_tokenizer(processing_class, trust_remote_code=args.trust_remote_code)
    scorers = []
    if reward_model is not None:
        if backend == "vllm":
            if not isinstance(reward_model, str):
                raise ValueError("backend='vllm' loads the reward model itself: pass its name or path.")
            from .vllm_engine import VLLMRewardScorer

            scorers.append(VLLMRewardScorer(reward_model, args))
        else:
            scorers.append(RewardModelScorer(reward_model, args))
    for func in reward_funcs or []:
        scorers.append(RewardFunctionScorer(func, processing_class, batch_size=max(args.reward_batch_size, 64)))
    return CombinedScorer(scorers, args.reward_weights)


def reward_names(reward_model, reward_funcs) -> list[str]:
    """Printable names of the rewards (for manifests and logs): the reward model first, then the functions."""
    names = [model_name(reward_model)] if reward_model is not None else []
    names += [
        f if isinstance(f, str) else f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', f)}"
        for f in (reward_funcs or [])
    ]
    return names


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
        rewards = scorer["scorer"](prompts, completions, progress=progress, **kwargs)
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
