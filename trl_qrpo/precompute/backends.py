"""The backends of the pre-computation, in one place: which sampler and which reward scorer a config asks for.

- samplers: :class:`~.transformers_sampler.TransformersSampler` or :class:`~.vllm_sampler.VLLMSampler`
  (``backend``: "transformers", "vllm" or "auto");
- reward scorers: the reward model on transformers (:class:`~.scorers.RewardModelScorer`) or vLLM
  (:class:`~.vllm_scorer.VLLMRewardScorer`) and the reward functions, combined with their weights.

The vLLM modules are imported only when chosen, so the package needs no vLLM.
"""

from __future__ import annotations

from .io import path_str
from .model_loading import load_causal_lm, load_tokenizer
from .scorers import CombinedScorer, RewardFunctionScorer, RewardModelScorer
from .transformers_sampler import TransformersSampler


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
        from .vllm_sampler import VLLMSampler

        return VLLMSampler(model, tokenizer, args)
    return TransformersSampler(load_causal_lm(model, args), tokenizer, args)


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
            from .vllm_scorer import VLLMRewardScorer

            scorers.append(VLLMRewardScorer(reward_model, args))
        else:
            scorers.append(RewardModelScorer(reward_model, args))
    for func in reward_funcs or []:
        scorers.append(RewardFunctionScorer(func, processing_class, batch_size=max(args.reward_batch_size, 64)))
    return CombinedScorer(scorers, args.reward_weights)
