"""`evaluate_policy`: reward, KL to the reference model and length of a policy's own samples (the last arrow).

For each prompt, `num_samples` completions are sampled from the policy (seeded per row and sample, like the
references), scored with the same scorers as `score_dataset`, and their sequence log-ratio
log pi(y|x) - log pi_ref(y|x) is computed by teacher forcing on the sampled tokens (stop token included), with
log-probabilities taken in float32 and summed in float32. The mean log-ratio over the policy's own samples is the
Monte Carlo estimate of KL(pi || pi_ref) (exact in expectation only when sampling from pi itself: temperature 1,
top_p 1, no top_k/min_p).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .chunks import ShardPlan, run_chunked
from .generate import model_name, resolve_tokenizer
from .io import ensure_prompt_column, is_conversational_value, logger, path_str, write_json
from .sampling import (
    TransformersSampler,
    as_completion,
    check_sampling_args,
    load_model,
    make_sampler,
    sample_seed,
    tokenize_prompt,
)
from .scoring import _NOT_KWARGS, make_scorer

SUMMARY_NAME = "summary.json"


def sequence_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
) -> list[float]:
    """log p(completion | prompt) per sequence, summed over completion tokens (float32 log-softmax and sum).

    Args:
        model ([`~transformers.PreTrainedModel`]): A causal LM.
        prompt_ids (`Sequence[Sequence[int]]`): Prompt token ids per sequence.
        completion_ids (`Sequence[Sequence[int]]`): Completion token ids per sequence (at least one each).
        pad_token_id (`int`): Padding id (masked out).
        batch_size (`int`, *optional*, defaults to `8`): Sequences per forward pass (sorted by length).

    Returns:
        `list[float]`: one log-probability per sequence.
    """
    import torch
    from trl.trainer.utils import pad, selective_log_softmax

    order = sorted(range(len(prompt_ids)), key=lambda i: -(len(prompt_ids[i]) + len(completion_ids[i])))
    out = [math.nan] * len(prompt_ids)
    device = model.device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            seqs = [torch.tensor(list(prompt_ids[i]) + list(completion_ids[i])) for i in batch]
            input_ids = pad(seqs, padding_value=pad_token_id, padding_side="right").to(device)
            attention_mask = pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="right").to(device)
            completion_mask = pad(
                [torch.tensor([0] * len(prompt_ids[i]) + [1] * len(completion_ids[i])) for i in batch],
                padding_value=0,
                padding_side="right",
            ).to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            token_logps = selective_log_softmax(logits, input_ids[:, 1:])
            sums = (token_logps * completion_mask[:, 1:].float()).sum(dim=1)
            for i, value in zip(batch, sums.tolist(), strict=True):
                out[i] = value
    return out


def summarize_evaluation(samples, **meta) -> dict:
    """Summary statistics of `evaluate_policy` samples (also used after merging shards).

    Args:
        samples ([`~datasets.Dataset`]): Per-sample rows with `reward`, `num_tokens`, `truncated` and, when a
            reference model was given, `logratio`.
        **meta: Extra entries for the summary (model names, sampling parameters).

    Returns:
        `dict`: `num_prompts`, `num_samples`, `mean_reward`, `std_reward`, `stderr_reward`, `kl` (mean sequence
        log-ratio, the KL estimate), `kl_stderr`, `mean_num_tokens`, `truncated_fraction`,
        `reward_length_spearman` (rank correlation of reward and length), and `meta`.
    """
    rewards = np.asarray(samples["reward"], dtype=np.float64)
    lengths = np.asarray(samples["num_tokens"], dtype=np.float64)
    n = len(rewards)

    def stderr(x):
        return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None

    summary = {
        "num_prompts": len(set(samples["row_index"])),
        "num_samples": n,
        "mean_reward": float(rewards.mean()),
        "std_reward": float(rewards.std(ddof=1)) if n > 1 else None,
        "stderr_reward": stderr(rewards),
        "mean_num_tokens": float(lengths.mean()),
        "truncated_fraction": float(np.mean(samples["truncated"])),
        "kl": None,
        "kl_stderr": None,
        "reward_length_spearman": None,
    }
    if "logratio" in samples.column_names:
        logratio = np.asarray(samples["logratio"], dtype=np.float64)
        summary["kl"], summary["kl_stderr"] = float(logratio.mean()), stderr(logratio)
    if n > 2 and np.ptp(rewards) > 0 and np.ptp(lengths) > 0:
        from scipy.stats import spearmanr

        summary["reward_length_spearman"] = float(spearmanr(rewards, lengths).statistic)
    summary.update(meta)
    return summary


def evaluate_policy(
    dataset,
    model,
    ref_model=None,
    processing_class=None,
    *,
    reward_model=None,
    reward_funcs: Sequence | None = None,
    reward_weights: Sequence[float] | None = None,
    reward_processing_class=None,
    reward_max_length: int | None = None,
    reward_batch_size: int = 8,
    reward_dtype: str | None = "auto",
    reward_label_index: int = 0,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    max_new_tokens: int = 512,
    seed: int = 0,
    batch_size: int = 16,
    logprob_batch_size: int = 8,
    backend: str = "auto",
    output_dir: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    chunk_size: int = 64,
    dtype: str | None = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
    model_init_kwargs: dict | None = None,
    vllm_kwargs: dict | None = None,
):
    """Sample from a (trained) policy and report reward, KL to the reference model and completion length.

    Args:
        dataset ([`~datasets.Dataset`]):
            Prompts (`prompt` column, plain or conversational; or `chosen`/`rejected` with an implicit prompt). Other
            columns are passed to reward functions.
        model (`str` or [`~transformers.PreTrainedModel`]):
            The policy to evaluate.
        ref_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The reference model pi_ref (same tokenizer). Without it, the KL is not computed.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or `str`, *optional*):
            The policy's tokenizer (default: saved with `model`).
        reward_model, reward_funcs, reward_weights, reward_processing_class:
            The reward, as in [`score_dataset`] (at least one of `reward_model`, `reward_funcs`).
        reward_max_length (`int`, *optional*), reward_batch_size (`int`, defaults to `8`), reward_dtype (`str`,
        defaults to `"auto"`), reward_label_index (`int`, defaults to `0`):
            Reward-model options (`max_length`, `batch_size`, `dtype`, `label_index` of [`score_dataset`]).
        num_samples (`int`, *optional*, defaults to `1`):
            Completions per prompt (the paper: 1 per prompt, 3 seeds).
        temperature (`float`, defaults to `1.0`), top_p (`float`, defaults to `1.0`), top_k (`int`, defaults to
        `0`), min_p (`float`, defaults to `0.0`), max_new_tokens (`int`, defaults to `512`):
            Sampling parameters. The KL estimate assumes pure sampling (the defaults).
        seed (`int`, *optional*, defaults to `0`):
            Base seed (per row and sample, as in [`generate_references`]).
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per `generate` call.
        logprob_batch_size (`int`, *optional*, defaults to `8`):
            Sequences per forward pass for the log-probabilities.
        backend (`str`, *optional*, defaults to `"auto"`):
            Sampling backend (`"transformers"`, `"vllm"`, `"auto"`); log-probabilities always use transformers.
        output_dir (`str`, *optional*), num_shards (`int`, defaults to `1`), shard_index (`int`, defaults to
        `0`), chunk_size (`int`, defaults to `64`):
            Resumable, sharded run as in [`generate_references`]; `summary.json` is written to `output_dir`.
        dtype (`str`, *optional*, defaults to `"auto"`), device (`str`, *optional*, defaults to `"auto"`),
        trust_remote_code (`bool`, defaults to `False`), model_init_kwargs (`dict`, *optional*), vllm_kwargs
        (`dict`, *optional*):
            Loading options for the policy and the reference model.

    Returns:
        `tuple[Dataset, dict]`: per-sample rows (`prompt`, `completion`, `row_index`, `sample_index`,
        `completion_ids` (the sampled tokens, stop token included), `num_tokens`, `truncated`, `reward`, and with a
        reference model `policy_logp`, `ref_logp`, `logratio`), and the summary of [`summarize_evaluation`].
    """
    model, ref_model, reward_model = path_str(model), path_str(ref_model), path_str(reward_model)
    processing_class, output_dir = path_str(processing_class), path_str(output_dir)
    check_sampling_args(temperature, top_p, top_k, min_p, max_new_tokens)
    if reward_model is None and not reward_funcs:
        raise ValueError("evaluate_policy needs a reward: give `reward_model` and/or `reward_funcs`.")
    if (temperature, top_p, top_k, min_p) != (1.0, 1.0, 0, 0.0):
        logger.warning("Sampling is not pure (temperature/top_p/top_k/min_p): the mean log-ratio is not the KL of pi.")
    dataset = ensure_prompt_column(dataset)
    conversational = is_conversational_value(dataset[0]["prompt"])
    tokenizer = resolve_tokenizer(processing_class, model, trust_remote_code=trust_remote_code)
    if ref_model is None:
        logger.warning("No ref_model: the KL to the reference model is not computed.")
    kwarg_columns = [c for c in dataset.column_names if c not in _NOT_KWARGS]
    params = {
        "model": model_name(model),
        "ref_model": model_name(ref_model) if ref_model is not None else None,
        "reward_model": model_name(reward_model) if reward_model is not None else None,
        "reward_funcs": [f if isinstance(f, str) else getattr(f, "__qualname__", str(f)) for f in reward_funcs or []],
        "reward_weights": list(reward_weights) if reward_weights else None,
        "reward_max_length": reward_max_length,
        "num_samples": num_samples,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "dtype": dtype,
        "backend": backend,
        "batch_size": batch_size,
        "device": device,
    }
    plan = ShardPlan(len(dataset), chunk_size, num_shards, shard_index)
    state = {}

    def setup():
        state["sampler"] = make_sampler(
            backend,
            model,
            tokenizer,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            revision=None,
            attn_implementation=None,
            model_init_kwargs=model_init_kwargs,
            vllm_kwargs=vllm_kwargs,
        )
        sampler = state["sampler"]
        state["policy"] = (
            sampler.model
            if isinstance(sampler, TransformersSampler)
            else load_model(
                model,
                dtype=dtype,
                device=device,
                trust_remote_code=trust_remote_code,
                model_init_kwargs=model_init_kwargs,
            )
        )
        if ref_model is not None:
            ref_tokenizer = (
                resolve_tokenizer(None, ref_model, trust_remote_code=trust_remote_code)
                if isinstance(ref_model, str)
                else tokenizer
            )
            if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(
                    f"The policy '{model_name(model)}' and the reference model '{model_name(ref_model)}' have "
                    "different vocabularies: their log-ratio is undefined. Use the reference model the policy was "
                    "trained from."
                )
            state["ref"] = load_model(ref_model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        state["scorer"] = make_scorer(
            reward_model,
            reward_funcs,
            reward_weights,
            reward_processing_class=reward_processing_class,
            processing_class=tokenizer,
            max_length=reward_max_length,
            batch_size=reward_batch_size,
            dtype=reward_dtype,
            device=device,
            label_index=reward_label_index,
            trust_remote_code=trust_remote_code,
        )

    def process_chunk(rows, indices, progress):
        if not state:
            setup()
        data = rows.to_dict()
        prompt_ids = [tokenize_prompt(tokenizer, row) for row in rows]
        seeds = [[sample_seed(seed, index, j) for j in range(num_samples)] for index in indices]
        samples = state["sampler"].sample(prompt_ids, seeds, progress)
        flat = [(pos, j, s) for pos, row in enumerate(samples) for j, s in enumerate(row)]
        out = {
            "prompt": [data["prompt"][pos] for pos, _, _ in flat],
            "completion": [as_completion(s.text, conversational) for _, _, s in flat],
            "row_index": [indices[pos] for pos, _, _ in flat],
            "sample_index": [j for _, j, _ in flat],
            "completion_ids": [s.sampled_ids for _, _, s in flat],
            "num_tokens": [s.num_tokens for _, _, s in flat],
            "truncated": [s.truncated for _, _, s in flat],
        }
        columns = {c: [data[c][pos] for pos, _, _ in flat] for c in kwarg_columns}
        out["reward"] = state["scorer"](out["prompt"], out["completion"], **columns)
        bad = [i for i, r in enumerate(out["reward"]) if math.isnan(r)]
        if bad:
            raise ValueError(
                f"Row {out['row_index'][bad[0]]}, sample {out['sample_index'][bad[0]]}: no reward applied "
                "(every reward function returned None)."
            )
        if "ref" in state:
            p_ids = [prompt_ids[pos] for pos, _, _ in flat]
            c_ids = out["completion_ids"]
            pad_id = tokenizer.pad_token_id
            out["policy_logp"] = sequence_logps(
                state["policy"], p_ids, c_ids, pad_token_id=pad_id, batch_size=logprob_batch_size
            )
            out["ref_logp"] = sequence_logps(
                state["ref"], p_ids, c_ids, pad_token_id=pad_id, batch_size=logprob_batch_size
            )
            out["logratio"] = [a - b for a, b in zip(out["policy_logp"], out["ref_logp"], strict=True)]
        import datasets

        return datasets.Dataset.from_dict(out)

    samples = run_chunked(
        dataset,
        process_chunk,
        plan=plan,
        output_dir=output_dir,
        task="evaluate",
        params=params,
        soft_params=("batch_size", "device", "backend"),
        units_per_row=num_samples,
        unit="sample",
        desc=f"Evaluating {model_name(model)}",
    )
    summary = summarize_evaluation(samples, meta=dict(params, num_shards=num_shards, shard_index=shard_index))
    if output_dir is not None:
        write_json(Path(output_dir) / SUMMARY_NAME, summary)
    logger.info("Evaluation summary: " + json.dumps({k: v for k, v in summary.items() if k != "meta"}))
    return samples, summary
