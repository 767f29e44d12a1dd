"""`generate_references`: n completions per prompt from the reference model (first step of QRPO's pre-computation)."""

from __future__ import annotations

import hashlib

from ..columns import PROMPT, REF_COMPLETION_IDS, REF_COMPLETIONS, REF_LOGPS, REF_NUM_TOKENS, REF_TRUNCATED
from ..tokenization import tokenize_prompt
from .backends import make_sampler
from .chunks import (
    ChunkedTask,
    ShardPlan,
    assemble_chunks,
    clean_stale_chunks,
    prepare_output_dir,
    run_chunked,
    spawn_workers,
)
from .config import GenerateConfig, is_pure_sampling
from .io import ensure_prompt_column, is_conversational_value, logger, model_name, path_str
from .model_loading import resolve_tokenizer
from .samples import as_completion, sample_seed


def _template_hash(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(str(template).encode()).hexdigest()[:16] if template else None


def generate_references(dataset, args: GenerateConfig, model=None, processing_class=None, *, _worker_rank=None):
    """Sample `args.num_generations` completions per prompt from the reference model pi_ref.

    QRPO turns each reward into its quantile among the rewards of the reference model's own completions for the same
    prompt; those quantiles (and the partition function built on them) are exact only when the references are drawn
    from pi_ref itself. The defaults therefore sample the model's distribution unaltered (temperature 1, top_p 1, no
    top_k/min_p/repetition penalty, the checkpoint's generation defaults ignored) and keep the text as sampled.
    Completions that hit `max_new_tokens` are kept and flagged in `ref_truncated`: dropping them would bias the set.

    Prompts are tokenised as DPOTrainer/QRPOTrainer tokenise them (chat template with generation prompt, the row's
    `tools` and `chat_template_kwargs`). Each completion has its own seed, derived from `args.seed`, the row's index
    in `dataset` and the completion's index: a row's references are the same whether the run is sharded, batched
    differently (up to floating-point noise across batch shapes) or interrupted and resumed.

    Args:
        dataset ([`~datasets.Dataset`]):
            Dataset with a `prompt` column (plain text or a list of `{"role", "content"}` messages), or with `chosen`
            and `rejected` sharing an implicit prompt (extracted as DPOTrainer does). Other columns are kept.
        args ([`GenerateConfig`]):
            Every option: the model and how it is loaded, sampling, the vLLM engine, the resumable run
            (`output_dir`, shards, chunks), `num_generations`, `seed`, `data_parallel_size`.
        model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The reference model, when not `args.model_name_or_path`: a Hub id or folder (required for the vLLM
            backend and data parallelism) or a loaded causal LM.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or `str`, *optional*):
            Tokenizer (or its path). Defaults to `args.tokenizer_name_or_path`, else the model's; a missing pad token
            falls back to EOS.

    Returns:
        [`~datasets.Dataset`]: the shard's rows with new list columns, one entry per reference:
        `ref_completions` (in the format of the prompts: strings, or `[{"role": "assistant", "content": ...}]`),
        `ref_truncated` (`bool`, the completion hit `max_new_tokens`), `ref_num_tokens` (`int`, tokens sampled,
        the stop token included), `ref_completion_ids` (the token ids sampled, the stop token included: the sequence
        training scores) and `ref_logps` (pi_ref's log-probability of those tokens: its own distribution,
        temperature 1, whatever the sampling settings; summed in float64 over float32 per-token log-probs). Rows
        built from them carry the ids and log-probs, so training needs no reference model.
    """
    model = path_str(model if model is not None else args.model_name_or_path)
    if model is None:
        raise ValueError("generate_references needs a model: set `model_name_or_path` or pass `model`.")
    processing_class = path_str(processing_class if processing_class is not None else args.tokenizer_name_or_path)
    output_dir = path_str(args.output_dir)
    for column in (REF_COMPLETIONS, REF_TRUNCATED, REF_NUM_TOKENS, REF_COMPLETION_IDS, REF_LOGPS):
        if column in dataset.column_names:
            raise ValueError(
                f"The dataset already has a '{column}' column. Remove it (`dataset.remove_columns`) to generate new "
                "references, or score the existing ones with `trl qrpo score`."
            )
    if not is_pure_sampling(args):
        logger.warning(
            "Sampling is not pure (temperature, top_p, top_k or min_p changed): the references are not draws from "
            "pi_ref, so their quantiles are not uniform and log Z is not exact. Their 'ref_logps' stay pi_ref's own "
            "log-probabilities of the sampled tokens."
        )
    dataset = ensure_prompt_column(dataset)
    conversational = is_conversational_value(dataset[0][PROMPT])
    tokenizer = resolve_tokenizer(
        processing_class, model, trust_remote_code=args.trust_remote_code, revision=args.model_revision
    )

    plan = ShardPlan(len(dataset), args.chunk_size, args.num_shards, args.shard_index)
    params = {
        "model": model_name(model),
        "revision": args.model_revision,
        "chat_template": _template_hash(tokenizer),
        **{name: getattr(args, name) for name in _RESULT_FIELDS},
        **{name: getattr(args, name) for name in _SOFT_FIELDS},
    }
    task = ChunkedTask(
        "generate",
        params,
        soft_params=_SOFT_FIELDS,
        units_per_row=args.num_generations,
        unit="completion",
        desc=f"Generating {args.num_generations} references per prompt",
    )

    if args.data_parallel_size > 1 and _worker_rank is None:
        if output_dir is None or not isinstance(model, str):
            raise ValueError("data_parallel_size > 1 needs `output_dir` and `model` given as a name or path.")
        prepare_output_dir(output_dir, task, plan)
        clean_stale_chunks(output_dir)
        kwargs = dict(dataset=dataset, args=args, model=model, processing_class=processing_class)
        spawn_workers(
            "trl_qrpo.precompute.generate.generate_references",
            kwargs,
            args.data_parallel_size,
            args.vllm_tensor_parallel_size,
        )
        result = assemble_chunks(output_dir, plan)
        _report_truncation(result)
        return result

    sampler = {}

    def process_chunk(rows, indices, progress):
        if "sampler" not in sampler:  # built lazily: a finished run that is called again loads no model
            sampler["sampler"] = make_sampler(args, model, tokenizer)
        prompt_ids = [tokenize_prompt(tokenizer, row) for row in rows]
        seeds = [[sample_seed(args.seed, index, j) for j in range(args.num_generations)] for index in indices]
        samples = sampler["sampler"].sample(prompt_ids, seeds, progress)
        rows = rows.add_column(
            REF_COMPLETIONS, [[as_completion(s.text, conversational) for s in row] for row in samples]
        )
        rows = rows.add_column(REF_TRUNCATED, [[s.truncated for s in row] for row in samples])
        rows = rows.add_column(REF_NUM_TOKENS, [[s.num_tokens for s in row] for row in samples])
        rows = rows.add_column(REF_COMPLETION_IDS, [[s.sampled_ids for s in row] for row in samples])
        return rows.add_column(REF_LOGPS, [[s.logp for s in row] for row in samples])

    worker = (
        {}
        if _worker_rank is None
        else {"worker_rank": _worker_rank, "num_workers": args.data_parallel_size, "assemble": False}
    )
    result = run_chunked(dataset, process_chunk, task, plan, output_dir, **worker)
    if result is not None:
        _report_truncation(result)
    return result


# Options that change the references (a restart with other values is refused) and options that do not.
_RESULT_FIELDS = ("num_generations", "temperature", "top_p", "top_k", "min_p", "max_new_tokens", "seed", "dtype")
_SOFT_FIELDS = ("batch_size", "device", "attn_implementation", "backend", "data_parallel_size")


def _report_truncation(dataset) -> None:
    flags = [flag for row in dataset[REF_TRUNCATED] for flag in row]
    if flags and any(flags):
        logger.warning(
            f"{sum(flags)} of {len(flags)} reference completions ({100 * sum(flags) / len(flags):.1f}%) hit "
            "max_new_tokens and are kept as sampled (column 'ref_truncated'). Dropping them would bias the reference "
            "set; if there are many, raise max_new_tokens."
        )
