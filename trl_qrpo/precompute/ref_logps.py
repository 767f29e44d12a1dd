"""`compute_ref_logps`: pi_ref's log-probability of every completion of a dataset, for training without a reference
model (the `ref-logps` step of the pre-computation).

Rows that `generate` produced carry these log-probs already (the sampler computed them). For any other rows, the
reference model scores each completion column here, in a separate job that can be sharded and resumed like
`generate` and `score`, instead of inside the training job. The sequences are built exactly as training builds them
(:func:`trl_qrpo.tokenization.tokenize_row`: the prompt's chat template, the EOS a plain-text completion gets, the
prompt/completion boundary, a completion's sampled token ids when the row has them), truncated as the training
collator truncates them (`max_length`, `truncation_mode`), and summed in float32 by :func:`trl_qrpo.logps.sequence_logps`.
"""

from __future__ import annotations

from ..columns import COMPLETION_COLUMNS, COMPLETIONS, PROMPT, SAMPLED_IDS, ids_column, ref_logp_column
from ..logps import sequence_logps
from ..tokenization import tokenize_row
from .chunks import ChunkedTask, ShardPlan, run_chunked
from .config import RefLogpsConfig
from .io import ensure_prompt_column, is_conversational_value, logger, model_name, path_str
from .model_loading import load_causal_lm, resolve_tokenizer


def compute_ref_logps(dataset, args: RefLogpsConfig, model=None, processing_class=None):
    """Add pi_ref's log-probability of each completion: `ref_logp` (`completion`), `chosen_ref_logp`, `rejected_ref_logp`.

    Args:
        dataset ([`~datasets.Dataset`]):
            Training rows: pointwise (`prompt`, `completion`) or paired (`prompt`, `chosen`, `rejected`), plain text or
            conversational, optionally with the sampled token ids of each side (`completion_ids`, `chosen_ids`,
            `rejected_ids`). Other columns are kept.
        args ([`RefLogpsConfig`]):
            The reference model and how it is loaded, `max_length` and `truncation_mode` (those training will use),
            the columns, and the resumable run.
        model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The reference model, when not `args.model_name_or_path`.
        processing_class ([`~transformers.PreTrainedTokenizerBase`] or `str`, *optional*):
            Its tokenizer (default: `args.tokenizer_name_or_path`, else the model's).

    Returns:
        [`~datasets.Dataset`]: the shard's rows with one float column per completion column.
    """
    model = path_str(model if model is not None else args.model_name_or_path)
    if model is None:
        raise ValueError("compute_ref_logps needs the reference model: set `model_name_or_path` or pass `model`.")
    processing_class = path_str(processing_class if processing_class is not None else args.tokenizer_name_or_path)
    dataset = ensure_prompt_column(dataset)
    available = [c for c in COMPLETION_COLUMNS if c in dataset.column_names]
    sides = available if args.columns is None else list(args.columns)
    unknown = [c for c in sides if c not in available]
    if unknown or not sides:
        raise ValueError(
            f"Nothing to score in column(s) {unknown or sides}: the dataset has {dataset.column_names}. Give "
            f"completion columns ({', '.join(COMPLETION_COLUMNS)})."
        )
    outputs = [ref_logp_column(side) for side in sides]
    existing = [c for c in outputs if c in dataset.column_names]
    if existing:
        logger.warning(f"Column(s) {existing} exist and are replaced by the new reference log-probs.")
        dataset = dataset.remove_columns(existing)
    tokenizer = resolve_tokenizer(
        processing_class, model, trust_remote_code=args.trust_remote_code, revision=args.model_revision
    )
    conversational = is_conversational_value(dataset[0][PROMPT])
    eos = None if conversational else tokenizer.eos_token  # what training appends to a plain-text completion
    params = {
        "model": model_name(model),
        "revision": args.model_revision,
        "dtype": args.dtype,
        "columns": sides,
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        "batch_size": args.logprob_batch_size,
        "device": args.device,
    }
    plan = ShardPlan(len(dataset), args.chunk_size, args.num_shards, args.shard_index)
    state = {}

    def process_chunk(rows, indices, progress):
        if "model" not in state:  # loaded lazily: a finished run that is called again loads no model
            state["model"] = load_causal_lm(model, args)
        prompt_ids, completion_ids = [], []
        for row in rows:
            example = {**row, COMPLETIONS: [row[side] for side in sides]}
            example[SAMPLED_IDS] = [row.get(ids_column(side)) for side in sides]
            tokenized = tokenize_row(example, tokenizer, eos)
            for ids in tokenized["completion_ids"]:
                prompt_ids.append(tokenized["prompt_ids"])
                completion_ids.append(ids)
        logps = sequence_logps(
            state["model"],
            prompt_ids,
            completion_ids,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=args.logprob_batch_size,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            progress=progress,
        )
        for k, column in enumerate(outputs):
            rows = rows.add_column(column, logps[k :: len(sides)])
        return rows

    task = ChunkedTask(
        "ref-logps",
        params,
        soft_params=("batch_size", "device"),
        units_per_row=len(sides),
        unit="sequence",
        desc=f"Reference log-probs of {', '.join(sides)}",
    )
    return run_chunked(dataset, process_chunk, task, plan, path_str(args.output_dir))
