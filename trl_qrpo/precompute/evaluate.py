"""`evaluate_policy`: reward, KL to the reference model and length of a policy's own samples (the last arrow).

For each prompt, `num_samples` completions are sampled from the policy (seeded per row and sample, like the
references; transformers or vLLM), scored with the same scorers as `score_dataset`, and their sequence log-ratio
log pi(y|x) - log pi_ref(y|x) is computed by teacher forcing on the sampled tokens (stop token included) through the
training code itself: the QRPO collator builds the batch and the trainer's fp32 sums add the per-token
log-probabilities, so the KL reported here and the log-ratios training regresses agree by construction. The mean
log-ratio over the policy's own samples is the Monte Carlo estimate of KL(pi || pi_ref) (exact in expectation only
when sampling from pi itself: temperature 1, top_p 1, no top_k/min_p).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..columns import (
    COMPLETION,
    COMPLETION_IDS,
    LENGTH_CONTROLLED_REWARD,
    LOGRATIO,
    NUM_TOKENS,
    POLICY_LOGP,
    PROMPT,
    REF_LOGP,
    REF_NUM_TOKENS,
    REF_REWARDS,
    REWARD,
    ROW_INDEX,
    SAMPLE_INDEX,
    TRUNCATED,
)
from ..logps import sequence_logps
from ..metrics import spearman_correlation, within_prompt_length_slope
from ..tokenization import tokenize_prompt
from .backends import make_sampler, make_scorer
from .chunks import ChunkedTask, ShardPlan, run_chunked
from .config import EvaluateConfig, is_pure_sampling
from .io import ensure_prompt_column, is_conversational_value, logger, model_name, path_str, rows_range, write_json
from .model_loading import load_causal_lm, resolve_tokenizer
from .samples import as_completion, sample_seed
from .scorers import RewardFunctionError, reward_function_kwarg_columns, reward_names

SUMMARY_NAME = "summary.json"


def summarize_evaluation(samples, **meta) -> dict:
    """Summary statistics of `evaluate_policy` samples (also used after merging shards).

    Args:
        samples ([`~datasets.Dataset`]): Per-sample rows with `reward`, `num_tokens`, `truncated` and, when a
            reference model was given, `logratio`.
        **meta: Extra entries for the summary (model names, sampling parameters).

    Returns:
        `dict`: `num_prompts`, `num_samples`, `mean_reward`, `std_reward`, `stderr_reward`, `kl` (mean sequence
        log-ratio, the KL estimate), `kl_stderr`, `mean_num_tokens`, `truncated_fraction`,
        `reward_length_spearman` (rank correlation of reward and length), with reference samples in the input
        `mean_length_controlled_reward` and its `stderr_length_controlled_reward`, and `meta`.
    """
    rewards = np.asarray(samples[REWARD], dtype=np.float64)
    lengths = np.asarray(samples[NUM_TOKENS], dtype=np.float64)
    n = len(rewards)

    def stderr(x):
        return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None

    summary = {
        "num_prompts": len(set(samples[ROW_INDEX])),
        "num_samples": n,
        "mean_reward": float(rewards.mean()),
        "std_reward": float(rewards.std(ddof=1)) if n > 1 else None,
        "stderr_reward": stderr(rewards),
        "mean_num_tokens": float(lengths.mean()),
        "truncated_fraction": float(np.mean(samples[TRUNCATED])),
        "kl": None,
        "kl_stderr": None,
        "reward_length_spearman": None,
    }
    if LOGRATIO in samples.column_names:
        logratio = np.asarray(samples[LOGRATIO], dtype=np.float64)
        summary["kl"], summary["kl_stderr"] = float(logratio.mean()), stderr(logratio)
    if n > 2:
        summary["reward_length_spearman"] = spearman_correlation(rewards, lengths)
    if LENGTH_CONTROLLED_REWARD in samples.column_names:
        controlled = np.asarray(samples[LENGTH_CONTROLLED_REWARD], dtype=np.float64)
        summary["mean_length_controlled_reward"] = float(controlled.mean())
        summary["stderr_length_controlled_reward"] = stderr(controlled)
    summary.update(meta)
    return summary


def evaluate_policy(
    dataset,
    args: EvaluateConfig,
    model=None,
    ref_model=None,
    processing_class=None,
    reward_model=None,
    reward_funcs=None,
):
    """Sample from a (trained) policy and report reward, KL to the reference model and completion length.

    Args:
        dataset ([`~datasets.Dataset`]):
            Prompts (`prompt` column, plain or conversational; or `chosen`/`rejected` with an implicit prompt). Other
            columns are passed to reward functions.
        args ([`EvaluateConfig`]):
            The policy and how it is loaded (the reference model is loaded the same way), sampling and its backend
            (`backend="vllm"` samples through vLLM; log-probabilities always come from the fp32 transformers path),
            the reward, `num_samples`, `seed`, `logprob_batch_size`, and the resumable run; `summary.json` is
            written to `output_dir`. The KL estimate assumes pure sampling (the default sampling options).
        model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The policy, when not `args.model_name_or_path`.
        ref_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The reference model pi_ref (same tokenizer), when not `args.ref_model_name_or_path`. Without either, the
            KL is not computed.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or `str`, *optional*):
            The policy's tokenizer (default: `args.tokenizer_name_or_path`, else saved with the policy).
        reward_model (`str` or [`~transformers.PreTrainedModel`], *optional*), reward_funcs (`list`, *optional*):
            Override the reward of `args` (at least one reward is needed).

    Returns:
        `tuple[Dataset, dict]`: per-sample rows (`prompt`, `completion`, `row_index`, `sample_index`,
        `completion_ids` (the sampled tokens, stop token included), `num_tokens`, `truncated`, `reward`, and with a
        reference model `policy_logp`, `ref_logp`, `logratio`), and the summary of [`summarize_evaluation`].
    """
    model = path_str(model if model is not None else args.model_name_or_path)
    ref_model = path_str(ref_model if ref_model is not None else args.ref_model_name_or_path)
    reward_model = path_str(reward_model if reward_model is not None else args.reward_model_name_or_path)
    reward_funcs = reward_funcs if reward_funcs is not None else args.reward_funcs
    processing_class = path_str(processing_class if processing_class is not None else args.tokenizer_name_or_path)
    output_dir = path_str(args.output_dir)
    if model is None:
        raise ValueError("evaluate_policy needs a policy: set `model_name_or_path` or pass `model`.")
    if reward_model is None and not reward_funcs:
        raise ValueError("Give a reward: --reward_model_name_or_path and/or --reward_funcs.")
    if not is_pure_sampling(args):
        logger.warning("Sampling is not pure (temperature/top_p/top_k/min_p): the mean log-ratio is not the KL of pi.")
    dataset = ensure_prompt_column(dataset)
    conversational = is_conversational_value(dataset[0][PROMPT])
    tokenizer = resolve_tokenizer(processing_class, model, trust_remote_code=args.trust_remote_code)
    if ref_model is None:
        logger.warning("No ref_model: the KL to the reference model is not computed.")
    kwarg_columns = reward_function_kwarg_columns(dataset.column_names)
    params = {
        "model": model_name(model),
        "ref_model": model_name(ref_model) if ref_model is not None else None,
        "rewards": reward_names(reward_model, reward_funcs),
        "reward_weights": list(args.reward_weights) if args.reward_weights else None,
        "reward_max_length": args.reward_max_length,
        **{name: getattr(args, name) for name in _RESULT_FIELDS},
        **{name: getattr(args, name) for name in _SOFT_FIELDS},
    }
    plan = ShardPlan(len(dataset), args.chunk_size, args.num_shards, args.shard_index)
    state = {}
    length_control = _length_control(dataset)
    if length_control is not None:
        params["length_slope"] = length_control[0]

    def setup():
        state["sampler"] = make_sampler(args, model, tokenizer)
        sampler = state["sampler"]
        # The transformers sampler holds the policy already; vLLM's engine does not lend its weights for log-probs.
        policy = getattr(sampler, "model", None)
        state["policy"] = policy if policy is not None else load_causal_lm(model, args)
        if ref_model is not None:
            ref_tokenizer = (
                resolve_tokenizer(None, ref_model, trust_remote_code=args.trust_remote_code)
                if isinstance(ref_model, str)
                else tokenizer
            )
            if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise ValueError(
                    f"The policy '{model_name(model)}' and the reference model '{model_name(ref_model)}' have "
                    "different vocabularies: their log-ratio is undefined. Use the reference model the policy was "
                    "trained from."
                )
            state["ref"] = load_causal_lm(ref_model, args)
        state["scorer"] = make_scorer(args, reward_model, reward_funcs, tokenizer)

    def process_chunk(rows, indices, progress):
        if not state:
            setup()
        data = rows.to_dict()
        prompt_ids = [tokenize_prompt(tokenizer, row) for row in rows]
        seeds = [[sample_seed(args.seed, index, j) for j in range(args.num_samples)] for index in indices]
        samples = state["sampler"].sample(prompt_ids, seeds, progress)
        flat = [(pos, j, s) for pos, row in enumerate(samples) for j, s in enumerate(row)]
        out = {
            PROMPT: [data[PROMPT][pos] for pos, _, _ in flat],
            COMPLETION: [as_completion(s.text, conversational) for _, _, s in flat],
            ROW_INDEX: [indices[pos] for pos, _, _ in flat],
            SAMPLE_INDEX: [j for _, j, _ in flat],
            COMPLETION_IDS: [s.sampled_ids for _, _, s in flat],
            NUM_TOKENS: [s.num_tokens for _, _, s in flat],
            TRUNCATED: [s.truncated for _, _, s in flat],
        }
        columns = {c: [data[c][pos] for pos, _, _ in flat] for c in kwarg_columns}
        try:
            out[REWARD] = state["scorer"](out[PROMPT], out[COMPLETION], **columns)
        except RewardFunctionError as error:
            rows = sorted({out[ROW_INDEX][i] for i in error.positions})
            raise ValueError(error.describe(f"samples of rows {rows_range(rows)} (0-based)")) from None
        if length_control is not None:  # reward - slope x (length - the prompt's mean reference length)
            slope, ref_lengths = length_control
            out[LENGTH_CONTROLLED_REWARD] = [
                r - slope * (n - ref_lengths[row])
                for r, n, row in zip(out[REWARD], out[NUM_TOKENS], out[ROW_INDEX], strict=True)
            ]
        bad = [i for i, r in enumerate(out[REWARD]) if math.isnan(r)]
        if bad:
            raise ValueError(
                f"Row {out[ROW_INDEX][bad[0]]}, sample {out[SAMPLE_INDEX][bad[0]]}: no reward applied "
                "(every reward function returned None)."
            )
        if "ref" in state:
            p_ids = [prompt_ids[pos] for pos, _, _ in flat]
            c_ids = out[COMPLETION_IDS]
            kwargs = {"pad_token_id": tokenizer.pad_token_id, "batch_size": args.logprob_batch_size}
            out[POLICY_LOGP] = sequence_logps(state["policy"], p_ids, c_ids, **kwargs)
            out[REF_LOGP] = sequence_logps(state["ref"], p_ids, c_ids, **kwargs)
            out[LOGRATIO] = [a - b for a, b in zip(out[POLICY_LOGP], out[REF_LOGP], strict=True)]
        import datasets

        return datasets.Dataset.from_dict(out)

    task = ChunkedTask(
        "evaluate",
        params,
        soft_params=_SOFT_FIELDS,
        units_per_row=args.num_samples,
        unit="sample",
        desc=f"Evaluating {model_name(model)}",
    )
    samples = run_chunked(dataset, process_chunk, task, plan, output_dir)
    summary = summarize_evaluation(
        samples, meta=dict(params, num_shards=args.num_shards, shard_index=args.shard_index)
    )
    if output_dir is not None:
        write_json(Path(output_dir) / SUMMARY_NAME, summary)
    logger.info("Evaluation summary: " + json.dumps({k: v for k, v in summary.items() if k != "meta"}))
    return samples, summary


def _length_control(dataset) -> tuple[float, list[float]] | None:
    """The length-controlled reward's regression, when the prompts come with their reference samples' rewards and
    lengths (`ref_rewards`, `ref_num_tokens`: `generate` + `score` output): the within-prompt slope of reward on length
    over the whole dataset (every shard computes the same) and each prompt's mean reference length."""
    if REF_REWARDS not in dataset.column_names or REF_NUM_TOKENS not in dataset.column_names:
        return None
    rewards, lengths = dataset[REF_REWARDS], dataset[REF_NUM_TOKENS]
    slope = within_prompt_length_slope(rewards, lengths)
    if slope is None:
        logger.warning("The reference samples' lengths do not vary: no length-controlled reward.")
        return None
    return slope, [float(np.mean(n)) if n else math.nan for n in lengths]


# Options that change the samples (a restart with other values is refused) and options that do not.
_RESULT_FIELDS = ("num_samples", "temperature", "top_p", "top_k", "min_p", "max_new_tokens", "seed", "dtype")
_SOFT_FIELDS = ("batch_size", "device", "backend")
