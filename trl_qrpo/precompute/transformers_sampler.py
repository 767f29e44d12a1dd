"""Sampling with transformers `generate`, one generator per completion: the `transformers` backend of `generate` and
`evaluate`.

Each sequence draws its tokens with its own `torch.Generator` (inverse-CDF sampling in a logits processor, then greedy
selection of the drawn token), so a completion depends on its seed only, not on the batch it shares or on which job
computes it. By default it samples the model's own distribution: temperature 1, top_p 1, no top_k, no min_p, no
repetition penalty, and none of the sampling defaults a checkpoint's `generation_config.json` may carry (quantiles
are exact only for references drawn from pi_ref itself). The contract shared with the vLLM sampler:
``sample(prompt_ids, seeds, progress) -> list[list[Sample]]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from .samples import Sample, decode_completion, split_stop, stop_token_ids


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
            self.step_logps = []  # per step, pi_ref's own log-prob of each row's drawn token (float32, [rows])

        def __call__(self, input_ids, scores):
            raw = torch.log_softmax(scores.float(), dim=-1)  # the model's distribution itself: temperature 1, no cut
            scores = warpers(input_ids, scores.float())
            probs = torch.softmax(scores, dim=-1).double()
            cdf = probs.cumsum(dim=-1)
            cdf = cdf / cdf[:, -1:]
            u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
            drawn = torch.searchsorted(cdf, u.to(cdf.device)[:, None], right=True).clamp_(max=scores.shape[-1] - 1)
            self.step_logps.append(raw.gather(1, drawn).squeeze(1).cpu())
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
                step_logps = torch.stack(sampler.step_logps, dim=1).double()  # [rows, steps]
                for row, ((i, j), ids) in enumerate(zip(batch, completions, strict=True)):
                    ids, truncated, num_tokens, stop = split_stop(ids, stops, self.max_new_tokens)
                    text = decode_completion(self.tokenizer, prompt_ids[i], ids)
                    logp = float(step_logps[row, :num_tokens].sum())  # the sampled tokens, stop token included
                    results[i][j] = Sample(ids, text, truncated, num_tokens, stop, logp)
                if progress is not None:
                    progress(len(batch))
        return results
