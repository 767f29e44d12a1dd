"""Sampling completions from a causal LM: prompts tokenised as DPOTrainer does, one seed per completion.

Two backends share one contract, ``sample(prompt_ids, seeds, progress) -> list[list[Sample]]``:

- :class:`TransformersSampler`: batched `model.generate` (CPU or GPU). Each sequence draws its tokens with its own
  `torch.Generator` (inverse-CDF sampling in a logits processor, then greedy selection of the drawn token), so a
  completion depends on its seed only, not on the batch it shares or on which job computes it.
- `VLLMSampler` (in :mod:`.vllm_engine`): `vllm.LLM.generate` with one seeded request per prompt; `vllm` is imported
  only there.

:func:`make_sampler` builds the backend a config asks for ([`GenerateConfig`] or [`EvaluateConfig`]: the sampling,
model and vLLM options travel as that one object).

Both sample from the model's own distribution by default: temperature 1, top_p 1, no top_k, no min_p, no repetition
penalty, and none of the sampling defaults a checkpoint's `generation_config.json` may carry (quantiles are exact
only for references drawn from pi_ref itself). The sampled text is kept as decoded (no stripping), and each sample
records whether it hit `max_new_tokens`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
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
    """

    token_ids: list[int]
    text: str
    truncated: bool
    num_tokens: int
    stop_token_id: int | None = None

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


def tokenize_prompt(tokenizer, example: dict) -> list[int]:
    """Token ids of a row's prompt, exactly as DPOTrainer tokenises prompts for training.

    Conversational prompts get the chat template with the generation prompt (and the row's `tools` and
    `chat_template_kwargs` when present); plain-text prompts are tokenised as is.
    """
    from trl.data_utils import _tokenize, is_conversational

    prompt = example["prompt"]
    if is_conversational({"prompt": prompt}):
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        return list(_tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"])
    if not isinstance(prompt, str):
        raise ValueError(
            f"Column 'prompt' holds a {type(prompt).__name__}; expected a string or a list of "
            "{'role', 'content'} messages."
        )
    return list(_tokenize(tokenizer, prompt)["input_ids"])


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


def _split_stop(ids: Sequence[int], stops: set[int], max_new_tokens: int) -> tuple[list[int], bool, int, int | None]:
    """Cut `ids` at the first stop token: (completion ids, truncated, number of tokens sampled, stop token)."""
    ids = list(ids)
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i], False, i + 1, token
    return ids, len(ids) >= max_new_tokens, len(ids), None


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """`AutoTokenizer.from_pretrained`, with the pad token falling back to EOS as in DPOTrainer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model,
    auto_class: str = "AutoModelForCausalLM",
    *,
    dtype: str | None = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    model_init_kwargs: dict | None = None,
):
    """Load `model` (a name or path) with the given transformers auto class, in eval mode on `device`.

    An already-built model is only put in eval mode (and moved to `device` unless it is placed by a device map).
    """
    import os

    import torch
    import transformers

    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        model.eval()
        if device not in (None, "auto") and getattr(model, "hf_device_map", None) is None:
            model.to(device)
        return model
    kwargs = dict(model_init_kwargs or {})
    if dtype is not None:
        kwargs.setdefault("dtype", dtype if dtype == "auto" else getattr(torch, dtype))
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    if revision is not None:
        kwargs.setdefault("revision", revision)
    if attn_implementation is not None:
        kwargs.setdefault("attn_implementation", attn_implementation)
    loaded = getattr(transformers, auto_class).from_pretrained(model, **kwargs)
    if "device_map" not in kwargs:
        loaded.to(resolve_device(device))
    return loaded.eval()


def load_causal_lm(model, args):
    """The causal LM of `args` ([`ModelArguments`]: dtype, device, revision, ...) or an already-built one, in eval mode."""
    return load_model(
        model,
        "AutoModelForCausalLM",
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        revision=args.model_revision,
        attn_implementation=args.attn_implementation,
        model_init_kwargs=args.model_init_kwargs,
    )


def _make_row_sampler(seeds: Sequence[int], temperature: float, top_p: float, top_k: int, min_p: float):
    """A logits processor that samples one token per row with that row's own generator.

    It applies transformers' temperature / top-k / top-p / min-p warpers, draws a uniform number from the row's CPU
    generator (the same draws on any device), inverts the cumulative distribution (float64), and returns scores that
    are -inf everywhere but at the drawn token, which greedy decoding then selects.
    """
    import torch
    from transformers import (
        LogitsProcessor,
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))

    class _RowSampler(LogitsProcessor):
        def __init__(self):
            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

        def __call__(self, input_ids, scores):
            scores = warpers(input_ids, scores.float())
            probs = torch.softmax(scores, dim=-1).double()
            cdf = probs.cumsum(dim=-1)
            cdf = cdf / cdf[:, -1:]
            u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
            drawn = torch.searchsorted(cdf, u.to(cdf.device)[:, None], right=True).clamp_(max=scores.shape[-1] - 1)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, drawn, 0.0)

    return _RowSampler()


@contextlib.contextmanager
def _clean_generation_config(model, stops: list[int], pad_token_id: int, bos_token_id: int | None):
    """Hide the checkpoint's generation defaults (top_k, repetition_penalty, suppress_tokens, ...) during sampling."""
    from transformers import GenerationConfig

    original = model.generation_config
    model.generation_config = GenerationConfig(
        eos_token_id=stops, pad_token_id=pad_token_id, bos_token_id=bos_token_id
    )
    try:
        yield
    finally:
        model.generation_config = original


class TransformersSampler:
    """Batched sampling with `model.generate`, one generator per sequence.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The causal LM (in eval mode, on its device).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer (pad token set).
        args ([`SamplingArguments`]):
            `temperature`, `top_p`, `top_k`, `min_p` (1, 1, 0, 0 sample the model's own distribution),
            `max_new_tokens` and `batch_size` (sequences per `generate` call).
    """

    def __init__(self, model, tokenizer, args):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.max_new_tokens, self.batch_size = args.max_new_tokens, args.batch_size
        self.stops = stop_token_ids(tokenizer, model)

    def sample(
        self, prompt_ids: list[list[int]], seeds: list[list[int]], progress: Callable[[int], None] | None = None
    ) -> list[list[Sample]]:
        """Sample `len(seeds[i])` completions of prompt `i`, completion `j` with seed `seeds[i][j]`."""
        import torch
        from transformers import GenerationConfig
        from trl.trainer.utils import pad

        jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(len(seeds[i]))]
        # Longest prompts first: less padding per batch, and a memory error shows up at the first batch.
        jobs.sort(key=lambda job: -len(prompt_ids[job[0]]))
        results: list[list[Sample | None]] = [[None] * len(s) for s in seeds]
        device = self.model.device
        pad_id = self.tokenizer.pad_token_id
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,  # the row sampler draws the token; greedy selection picks it
            eos_token_id=self.stops,
            pad_token_id=pad_id,
            bos_token_id=self.tokenizer.bos_token_id,
            disable_compile=True,
        )
        stops = set(self.stops)
        with (
            _clean_generation_config(self.model, self.stops, pad_id, self.tokenizer.bos_token_id),
            torch.inference_mode(),
        ):
            for start in range(0, len(jobs), self.batch_size):
                batch = jobs[start : start + self.batch_size]
                inputs = [torch.tensor(prompt_ids[i]) for i, _ in batch]
                input_ids = pad(inputs, padding_value=pad_id, padding_side="left").to(device)
                attention_mask = pad([torch.ones_like(x) for x in inputs], padding_value=0, padding_side="left").to(
                    device
                )
                sampler = _make_row_sampler(
                    [seeds[i][j] for i, j in batch],
                    self.args.temperature,
                    self.args.top_p,
                    self.args.top_k,
                    self.args.min_p,
                )
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=[sampler],
                )
                completions = out[:, input_ids.shape[1] :].tolist()
                for (i, j), ids in zip(batch, completions, strict=True):
                    ids, truncated, num_tokens, stop = _split_stop(ids, stops, self.max_new_tokens)
                    text = decode_completion(self.tokenizer, prompt_ids[i], ids)
                    results[i][j] = Sample(ids, text, truncated, num_tokens, stop)
                if progress is not None:
                    progress(len(batch))
        return results


def resolve_backend(backend: str, model) -> str:
    """`"auto"` -> `"vllm"` when vLLM is installed, a GPU is visible and `model` is a name or path; else as given."""
    import importlib.util

    import torch

    if backend != "auto":
        return backend
    if importlib.util.find_spec("vllm") and torch.cuda.is_available() and isinstance(model, str):
        return "vllm"
    return "transformers"


def make_sampler(args, model, tokenizer):
    """The sampler of `args.backend` for `model` (a name/path, or a loaded model for the transformers backend).

    Args:
        args ([`GenerateConfig`] or [`EvaluateConfig`]):
            The sampling options ([`SamplingArguments`]), how to load the model ([`ModelArguments`]) and the vLLM
            engine options ([`VLLMArguments`]), plus the base `seed`.
        model (`str` or [`~transformers.PreTrainedModel`]):
            The model to sample from.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
    """
    backend = resolve_backend(args.backend, model)
    if backend == "vllm":
        if not isinstance(model, str):
            raise ValueError("backend='vllm' loads the model itself: pass its name or path, not a model object.")
        from .vllm_engine import VLLMSampler

        return VLLMSampler(model, tokenizer, args)
    return TransformersSampler(load_causal_lm(model, args), tokenizer, args)
