"""The scorers of `score` and `evaluate`: a reward model (transformers) and reward functions, combined.

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

from ..columns import COMPLETION_AND_REFERENCE_COLUMNS, COMPLETION_IDS
from .io import model_name, path_str
from .model_loading import load_model, load_tokenizer


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


class RewardFunctionError(ValueError):
    """A reward function raised: its name, the positions of the completions it was called on, and the error.

    The stages turn the positions into the dataset rows they came from (:meth:`describe`).
    """

    def __init__(self, name: str, positions: range, error: Exception):
        self.name, self.positions, self.error = name, positions, error
        super().__init__(self.describe(f"completions {positions.start}-{positions.stop - 1} of the batch"))

    def describe(self, where: str) -> str:
        return (
            f"The reward function '{self.name}' raised {type(self.error).__name__}: {self.error} (called on {where}). "
            "Fix the function (it must return one float, or None where it does not apply, per completion) or drop "
            "those rows."
        )


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
            try:
                output = self.func(prompts=prompts[start:end], completions=completions[start:end], **kwargs)
                if inspect.isawaitable(output):
                    output = asyncio.run(output)
            except Exception as error:  # the user's function: say which one, and on which completions
                raise RewardFunctionError(self.name, range(start, end), error) from error
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


def reward_names(reward_model, reward_funcs) -> list[str]:
    """Printable names of the rewards (for manifests and logs): the reward model first, then the functions."""
    names = [model_name(reward_model)] if reward_model is not None else []
    names += [
        f if isinstance(f, str) else f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', f)}"
        for f in (reward_funcs or [])
    ]
    return names
