"""The `vllm` backend of `score` and `evaluate`'s reward model: a sequence-classification reward model served by
vLLM's pooling runner, scoring the same tokens as the transformers scorer (see :mod:`.vllm_engine`)."""

from __future__ import annotations

import os

from .io import logger
from .scorers import load_reward_tokenizer, reward_model_token_ids
from .vllm_engine import engine_kwargs, import_vllm


class VLLMRewardScorer:
    """Scores (prompt, completion) pairs with a sequence-classification reward model served by vLLM's pooling runner.

    The texts, their tokens and their truncation are those of [`RewardModelScorer`] (`completion_texts`, the reward
    tokenizer without special tokens added, the first `reward_max_length` tokens kept and counted in
    `num_truncated`); the token ids are sent to `LLM(runner="pooling").classify` with the head's activation off, so the
    reward is the raw logit of `reward_label_index`, equal to the transformers backend's (within float tolerance).
    transformers pools the last token that is not the pad token; trailing pad tokens (e.g. a text ending in EOS when
    pad = EOS) are therefore dropped before sending, which gives vLLM's last-token pooling the same position.

    Args:
        model_name_or_path (`str`):
            Reward model id or folder (a `*ForSequenceClassification` checkpoint; vLLM loads it itself).
        config ([`ScoreConfig`] or [`EvaluateConfig`]):
            Reads `reward_tokenizer_name_or_path`, `reward_max_length` (also the engine's `max_model_len` unless
            `vllm_max_model_length` is given), `reward_dtype`, `reward_label_index`, `trust_remote_code` and
            the `vllm_*` options. `reward_batch_size` does not apply: vLLM schedules the
            batches itself.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The reward model's tokenizer, overriding `config.reward_tokenizer_name_or_path`.
    """

    def __init__(self, model_name_or_path: str, config, processing_class=None):
        vllm = import_vllm()
        from transformers import AutoConfig

        model_name_or_path = os.fspath(model_name_or_path)
        trust = bool(getattr(config, "trust_remote_code", False))
        self.tokenizer = load_reward_tokenizer(model_name_or_path, config, processing_class)
        num_labels = getattr(AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust), "num_labels", 1)
        self.label_index = int(config.reward_label_index)
        if not 0 <= self.label_index < num_labels:
            raise ValueError(f"reward_label_index={self.label_index} but the reward model has {num_labels} label(s).")
        self.max_length = config.reward_max_length
        self.num_truncated = 0
        self.name = os.path.basename(str(model_name_or_path).rstrip("/"))
        extra = {"runner": "pooling"}
        if self.max_length is not None and getattr(config, "vllm_max_model_length", None) is None:
            extra["max_model_len"] = int(self.max_length)
        kwargs = engine_kwargs(config, dtype=getattr(config, "reward_dtype", None), extra=extra)
        logger.info(f"Starting vLLM (pooling runner) for reward model '{model_name_or_path}' with {kwargs}.")
        self.llm = vllm.LLM(model=model_name_or_path, **kwargs)
        tasks = tuple(getattr(self.llm, "supported_tasks", ()) or ())
        if "classify" not in tasks:
            raise ValueError(
                f"vLLM did not load '{model_name_or_path}' as a classification model (its tasks: {tasks}). The reward "
                "model must be a `*ForSequenceClassification` checkpoint; for another architecture try "
                '--vllm_kwargs \'{"convert": "classify"}\'.'
            )
        self._pad_id = self.tokenizer.pad_token_id

    def token_ids(self, prompts, completions) -> list[list[int]]:
        """The reward model's input ids of each (prompt, completion), as [`RewardModelScorer.token_ids`] makes them."""
        ids, truncated = reward_model_token_ids(self.tokenizer, prompts, completions, self.max_length)
        self.num_truncated += truncated
        return ids

    def _pooled_prefix(self, ids: list[int]) -> list[int]:
        """`ids` up to the token transformers pools: the last one that is not the pad token (the first if none)."""
        if self._pad_id is None:
            return ids
        end = len(ids)
        while end > 1 and ids[end - 1] == self._pad_id:
            end -= 1
        return ids[:end]

    def __call__(self, prompts, completions, progress=None, **columns) -> list[float]:
        from vllm.pooling_params import PoolingParams

        ids = self.token_ids(prompts, completions)
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise ValueError(f"Completion {empty[0]} (and {len(empty) - 1} more) tokenises to no token at all.")
        if not ids:
            return []
        outputs = self.llm.classify(
            [{"prompt_token_ids": self._pooled_prefix(x)} for x in ids],
            pooling_params=PoolingParams(use_activation=False),
            use_tqdm=False,
        )
        rewards = [float(output.outputs.probs[self.label_index]) for output in outputs]
        if progress is not None:
            progress(len(rewards))
        return rewards
