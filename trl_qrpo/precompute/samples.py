"""The sample record and what every sampler shares: per-completion seeds, stop tokens, decoding.

Both samplers (transformers, :mod:`.transformers_sampler`; vLLM, :mod:`.vllm_sampler`) return :class:`Sample` records
and derive each completion's seed with :func:`sample_seed`. Imports no stage and no backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    """One sampled completion.

    Args:
        token_ids (`list[int]`): Completion tokens, without the stop token.
        text (`str`): Decoded completion, without the stop token, exactly as decoded (not stripped).
        truncated (`bool`): Whether the completion hit the token limit (no stop token was sampled).
        num_tokens (`int`): Tokens sampled, the stop token included when one was sampled.
        stop_token_id (`int`, *optional*): The stop token that ended the completion (`None` when truncated).
        logp (`float`, *optional*): log pi(sampled_ids | prompt) under the model's own distribution (temperature 1,
            no top-p/top-k, whatever the sampling settings), summed in float64 over per-token float32 log-probs.
    """

    token_ids: list[int]
    text: str
    truncated: bool
    num_tokens: int
    stop_token_id: int | None = None
    logp: float | None = None

    @property
    def sampled_ids(self) -> list[int]:
        """Every sampled token, the stop token included: the sequence whose log-probability is the sample's."""
        return self.token_ids + ([self.stop_token_id] if self.stop_token_id is not None else [])


def sample_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from `seed` and integer keys (row index, sample index) with NumPy's `SeedSequence`.

    Derived seeds of different keys are statistically independent, and a seed depends only on its keys: a row's
    completions are the same whatever shard, chunk or batch computes them.
    """
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"Seeds and row indices must be non-negative, got seed={seed}, keys={keys}.")
    state = np.random.SeedSequence(entropy=seed, spawn_key=tuple(int(k) for k in keys)).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The tokenizer's EOS and the model generation config's EOS ids (as GRPOTrainer stops generation)."""
    ids = []
    if model is not None and getattr(model, "generation_config", None) is not None:
        eos = model.generation_config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    if not ids:
        raise ValueError(
            "Neither the tokenizer nor the model's generation config defines an EOS token: generation could not "
            "stop. Set `tokenizer.eos_token`."
        )
    return ids


def decode_completion(tokenizer, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> str:
    """Decode completion tokens as they read after the prompt (no stripping, special tokens kept).

    Decoding the completion alone can lose a leading space (SentencePiece drops it at the start of a text), so the
    prompt is decoded with it and removed again when it is a prefix.
    """
    kwargs = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    alone = tokenizer.decode(list(completion_ids), **kwargs)
    if not completion_ids:
        return alone
    context = list(prompt_ids[-8:])
    prefix = tokenizer.decode(context, **kwargs)
    full = tokenizer.decode(context + list(completion_ids), **kwargs)
    return full[len(prefix) :] if full.startswith(prefix) else alone


def as_completion(text: str, conversational: bool):
    """A completion in the dataset's format: a string, or `[{"role": "assistant", "content": text}]`."""
    return [{"role": "assistant", "content": text}] if conversational else text


def split_stop(ids: Sequence[int], stops: set[int], max_new_tokens: int) -> tuple[list[int], bool, int, int | None]:
    """Cut `ids` at the first stop token: (completion ids, truncated, number of tokens sampled, stop token)."""
    ids = list(ids)
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i], False, i + 1, token
    return ids, len(ids) >= max_new_tokens, len(ids), None
