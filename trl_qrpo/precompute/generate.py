"""`generate_references`: n completions per prompt from the reference model (first step of QRPO's pre-computation)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .chunks import ShardPlan, assemble_chunks, clean_stale_chunks, prepare_output_dir, run_chunked, spawn_workers
from .io import (
    COMPLETION_REWARD_COLUMNS,
    REF_COMPLETIONS,
    REF_NUM_TOKENS,
    REF_TRUNCATED,
    ensure_prompt_column,
    is_conversational_value,
    logger,
    path_str,
)
from .sampling import as_completion, check_sampling_args, load_tokenizer, make_sampler, sample_seed, tokenize_prompt


def model_name(model) -> str:
    """A printable name of a model given as a path/id or as a loaded model."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return getattr(model, "name_or_path", None) or type(model).__name__


def resolve_tokenizer(processing_class, model, *, trust_remote_code: bool = False, revision: str | None = None):
    """The given tokenizer, or the one saved with `model` (pad token falling back to EOS)."""
    if processing_class is not None:
        if isinstance(processing_class, str):
            return load_tokenizer(processing_class, trust_remote_code=trust_remote_code, revision=revision)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        return processing_class
    name = model_name(model)
    if not isinstance(model, str) and not Path(name).exists():
        raise ValueError("Pass `processing_class`: the tokenizer cannot be found from a model object without a path.")
    return load_tokenizer(name, trust_remote_code=trust_remote_code, revision=revision)


def check_completion_formats(dataset, conversational: bool) -> None:
    """Refuse a dataset whose completion columns are not in the format (plain or conversational) of its prompts."""
    first = dataset[0]
    for column in COMPLETION_REWARD_COLUMNS:
        if column in first and first[column] is not None and is_conversational_value(first[column]) != conversational:
            raise ValueError(
                f"Column '{column}' is {'conversational' if not conversational else 'plain text'} but 'prompt' is "
                f"{'conversational' if conversational else 'plain text'} (row 0). Use one format for prompts and "
                "completions, as TRL's trainers expect."
            )


def _template_hash(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(str(template).encode()).hexdigest()[:16] if template else None


def generate_references(
    dataset,
    model,
    processing_class=None,
    *,
    num_generations: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    max_new_tokens: int = 512,
    seed: int = 42,
    batch_size: int = 16,
    backend: str = "auto",
    output_dir: str | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    chunk_size: int = 64,
    dtype: str | None = "auto",
    device: str | None = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
    model_init_kwargs: dict | None = None,
    vllm_kwargs: dict | None = None,
    data_parallel_size: int = 1,
    _worker_rank: int | None = None,
):
    """Sample `num_generations` completions per prompt from the reference model pi_ref.

    QRPO turns each reward into its quantile among the rewards of the reference model's own completions for the same
    prompt; those quantiles (and the partition function built on them) are exact only when the references are drawn
    from pi_ref itself. The defaults therefore sample the model's distribution unaltered (temperature 1, top_p 1, no
    top_k/min_p/repetition penalty, the checkpoint's generation defaults ignored) and keep the text as sampled.
    Completions that hit `max_new_tokens` are kept and flagged in `ref_truncated`: dropping them would bias the set.

    Prompts are tokenised as DPOTrainer/QRPOTrainer tokenise them (chat template with generation prompt, the row's
    `tools` and `chat_template_kwargs`). Each completion has its own seed, derived from `seed`, the row's index in
    `dataset` and the completion's index: a row's references are the same whether the run is sharded, batched
    differently (up to floating-point noise across batch shapes) or interrupted and resumed.

    Args:
        dataset ([`~datasets.Dataset`]):
            Dataset with a `prompt` column (plain text or a list of `{"role", "content"}` messages), or with `chosen`
            and `rejected` sharing an implicit prompt (extracted as DPOTrainer does). Other columns are kept.
        model (`str` or [`~transformers.PreTrainedModel`]):
            The reference model: a Hub id or local folder (required for the vLLM backend and data parallelism), or
            a loaded causal LM.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or `str`, *optional*):
            Tokenizer (or its path). Defaults to the tokenizer saved with `model`; a missing pad token falls back to
            EOS.
        num_generations (`int`, *optional*, defaults to `8`):
            Reference completions per prompt (the paper generates 50 and trains with 1 to 3).
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature. Anything but 1 samples from another distribution than pi_ref.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold; 1 disables it.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k sampling; 0 disables it.
        min_p (`float`, *optional*, defaults to `0.0`):
            Min-p sampling; 0 disables it.
        max_new_tokens (`int`, *optional*, defaults to `512`):
            Token limit of a completion (the paper used 2048). Completions that reach it are flagged in
            `ref_truncated`.
        seed (`int`, *optional*, defaults to `42`):
            Base seed; each completion's seed is derived from it, its row index and its sample index.
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per `generate` call (transformers backend).
        backend (`str`, *optional*, defaults to `"auto"`):
            `"transformers"`, `"vllm"`, or `"auto"` (vLLM when installed, a GPU is visible and `model` is a path).
        output_dir (`str`, *optional*):
            Folder for the resumable run: finished chunks are written there as they complete, a rerun of the same
            call resumes, and the result is saved there (`datasets.load_from_disk(output_dir)`). `None` keeps
            everything in memory.
        num_shards (`int`, *optional*, defaults to `1`):
            Split the dataset into this many shards (one job each); merge them with [`merge_shards`].
        shard_index (`int`, *optional*, defaults to `0`):
            The shard this call computes.
        chunk_size (`int`, *optional*, defaults to `64`):
            Prompts per chunk, the unit written to disk and skipped on restart. Shards are made of whole chunks.
        dtype (`str`, *optional*, defaults to `"auto"`):
            Model dtype (`"auto"`: the checkpoint's; `"float32"`, `"bfloat16"`, `"float16"`).
        device (`str`, *optional*, defaults to `"auto"`):
            Device of the transformers backend (`"auto"`: CUDA when available, else CPU).
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow custom model code from the Hub.
        revision (`str`, *optional*):
            Model revision (branch, tag or commit).
        attn_implementation (`str`, *optional*):
            Attention implementation of the transformers backend (e.g. `"sdpa"`, `"flash_attention_2"`).
        model_init_kwargs (`dict`, *optional*):
            More keyword arguments for `AutoModelForCausalLM.from_pretrained` (e.g. `{"device_map": "auto"}`).
        vllm_kwargs (`dict`, *optional*):
            Keyword arguments for `vllm.LLM(...)`: `tensor_parallel_size`, `gpu_memory_utilization`,
            `max_model_len`, `enforce_eager`, `enable_prefix_caching`, ... (`dtype`, `revision`,
            `trust_remote_code` are filled from the arguments above).
        data_parallel_size (`int`, *optional*, defaults to `1`):
            Worker processes on this node, each with its own model copy on `tensor_parallel_size` GPUs (from
            `vllm_kwargs`, else 1), sharing this shard's chunks. Needs `output_dir` and a model path.

    Returns:
        [`~datasets.Dataset`]: the shard's rows with three new list columns, one entry per reference:
        `ref_completions` (in the format of the prompts: strings, or `[{"role": "assistant", "content": ...}]`),
        `ref_truncated` (`bool`, the completion hit `max_new_tokens`) and `ref_num_tokens` (`int`, tokens sampled,
        the stop token included).
    """
    model, processing_class, output_dir = path_str(model), path_str(processing_class), path_str(output_dir)
    check_sampling_args(temperature, top_p, top_k, min_p, max_new_tokens)
    if num_generations < 1 or batch_size < 1:
        raise ValueError(f"num_generations and batch_size must be >= 1, got {num_generations} and {batch_size}.")
    for column in (REF_COMPLETIONS, REF_TRUNCATED, REF_NUM_TOKENS):
        if column in dataset.column_names:
            raise ValueError(
                f"The dataset already has a '{column}' column. Remove it (`dataset.remove_columns`) to generate new "
                "references, or score the existing ones with `trl qrpo score`."
            )
    dataset = ensure_prompt_column(dataset)
    conversational = is_conversational_value(dataset[0]["prompt"])
    check_completion_formats(dataset, conversational)
    tokenizer = resolve_tokenizer(processing_class, model, trust_remote_code=trust_remote_code, revision=revision)

    plan = ShardPlan(len(dataset), chunk_size, num_shards, shard_index)
    params = {
        "model": model_name(model),
        "revision": revision,
        "chat_template": _template_hash(tokenizer),
        "num_generations": num_generations,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "backend": backend,
        "dtype": dtype,
        "batch_size": batch_size,
        "device": device,
        "attn_implementation": attn_implementation,
        "vllm_kwargs": vllm_kwargs,
        "data_parallel_size": data_parallel_size,
    }
    soft = ("batch_size", "device", "attn_implementation", "vllm_kwargs", "data_parallel_size", "backend")
    run_kwargs = dict(
        task="generate",
        params=params,
        soft_params=soft,
        units_per_row=num_generations,
        unit="completion",
        desc=f"Generating {num_generations} references per prompt",
    )

    if data_parallel_size > 1 and _worker_rank is None:
        if output_dir is None or not isinstance(model, str):
            raise ValueError("data_parallel_size > 1 needs `output_dir` and `model` given as a name or path.")
        prepare_output_dir(output_dir, task="generate", params=params, plan=plan, soft_params=soft)
        clean_stale_chunks(output_dir)
        kwargs = dict(
            dataset=dataset,
            model=model,
            processing_class=processing_class,
            num_generations=num_generations,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            backend=backend,
            output_dir=output_dir,
            num_shards=num_shards,
            shard_index=shard_index,
            chunk_size=chunk_size,
            dtype=dtype,
            device=device,
            trust_remote_code=trust_remote_code,
            revision=revision,
            attn_implementation=attn_implementation,
            model_init_kwargs=model_init_kwargs,
            vllm_kwargs=vllm_kwargs,
            data_parallel_size=data_parallel_size,
        )
        tp = int((vllm_kwargs or {}).get("tensor_parallel_size", 1))
        spawn_workers("trl_qrpo.precompute.generate.generate_references", kwargs, data_parallel_size, tp)
        result = assemble_chunks(output_dir, plan)
        _report_truncation(result)
        return result

    sampler = {}

    def process_chunk(rows, indices, progress):
        if "sampler" not in sampler:  # built lazily: a finished run that is called again loads no model
            sampler["sampler"] = make_sampler(
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
                revision=revision,
                attn_implementation=attn_implementation,
                model_init_kwargs=model_init_kwargs,
                vllm_kwargs=vllm_kwargs,
            )
        prompt_ids = [tokenize_prompt(tokenizer, row) for row in rows]
        seeds = [[sample_seed(seed, index, j) for j in range(num_generations)] for index in indices]
        samples = sampler["sampler"].sample(prompt_ids, seeds, progress)
        rows = rows.add_column(
            REF_COMPLETIONS, [[as_completion(s.text, conversational) for s in row] for row in samples]
        )
        rows = rows.add_column(REF_TRUNCATED, [[s.truncated for s in row] for row in samples])
        return rows.add_column(REF_NUM_TOKENS, [[s.num_tokens for s in row] for row in samples])

    worker = (
        {}
        if _worker_rank is None
        else {"worker_rank": _worker_rank, "num_workers": data_parallel_size, "assemble": False}
    )
    result = run_chunked(dataset, process_chunk, plan=plan, output_dir=output_dir, **run_kwargs, **worker)
    if result is not None:
        _report_truncation(result)
    return result


def _report_truncation(dataset) -> None:
    flags = [flag for row in dataset[REF_TRUNCATED] for flag in row]
    if flags and any(flags):
        logger.warning(
            f"{sum(flags)} of {len(flags)} reference completions ({100 * sum(flags) / len(flags):.1f}%) hit "
            "max_new_tokens and are kept as sampled (column 'ref_truncated'). Dropping them would bias the reference "
            "set; if there are many, raise max_new_tokens."
        )
