"""The `vllm` backend of `generate` and `evaluate`: sampling with vLLM's offline engine, one seeded request per
completion (see :mod:`.vllm_engine` for what vLLM does that this relies on)."""

from __future__ import annotations

from collections.abc import Callable

from .io import logger
from .samples import Sample, decode_completion, stop_token_ids
from .vllm_engine import engine_kwargs, generation_config_eos, import_vllm


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
            request has its own), `dtype`, `model_revision`, `trust_remote_code` and the `vllm_*`
            options: `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len`, `enforce_eager`,
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
        for token in generation_config_eos(model_name_or_path, revision, trust):
            if token not in self.stops:
                self.stops.append(token)
        kwargs = engine_kwargs(
            config,
            dtype=getattr(config, "dtype", None),
            revision=revision,
            seed=config.seed,
            extra={"logprobs_mode": "raw_logprobs"},  # pi_ref's own log-probs, before temperature or top-p
        )
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
            logprobs=0,  # the sampled token's log-prob; the engine reports raw ones (logprobs_mode="raw_logprobs")
        )

    @staticmethod
    def _logp(completion) -> float | None:
        """log pi(sampled tokens | prompt): the raw log-probs vLLM reports for each sampled token, summed in float64."""
        if completion.logprobs is None:
            return None
        total = 0.0
        for token, entry in zip(completion.token_ids, completion.logprobs, strict=True):
            total += float(entry[token].logprob)
        return total

    def _to_sample(self, prompt_ids: list[int], completion) -> Sample:
        """A `Sample` from one vLLM `CompletionOutput` (stop token cut off and counted)."""
        ids = list(completion.token_ids)
        logp = self._logp(completion)
        reason = completion.finish_reason
        if reason == "length":
            return Sample(ids, decode_completion(self.tokenizer, prompt_ids, ids), True, len(ids), None, logp)
        if reason != "stop":
            raise RuntimeError(f"vLLM finished a request with finish_reason={reason!r} (expected 'stop' or 'length').")
        if ids and ids[-1] in self.stops:  # vLLM 0.32 keeps the stop token at the end of token_ids
            stop = ids.pop()
        else:  # a vLLM that leaves it out: it is still a sampled token (its log-prob is then not reported)
            stop = completion.stop_reason if isinstance(completion.stop_reason, int) else self.tokenizer.eos_token_id
            logp = None
        return Sample(ids, decode_completion(self.tokenizer, prompt_ids, ids), False, len(ids) + 1, stop, logp)

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
