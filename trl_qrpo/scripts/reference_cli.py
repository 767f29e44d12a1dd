"""Command line of QRPO's pre-computation phase: `generate`, `score`, `build-offpolicy`, `merge`, `evaluate`.

Each command is a function `fn(argv: list[str], prog: str) -> int` in :data:`SUBCOMMANDS`; the `trl qrpo` /
`trl-qrpo` front end routes to them. Arguments are dataclass fields parsed with TRL's `TrlParser`, so
`--config recipe.yaml` works as for TRL's own commands (YAML keys are field names; flags override them; an `env:`
mapping sets environment variables).

Examples::

    trl-qrpo generate --dataset_name trl-lib/ultrafeedback-prompt --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --num_generations 8 --max_new_tokens 1024 --output_dir data/refs
    trl-qrpo score --dataset_name data/refs --reward_model_name_or_path Skywork/Skywork-Reward-V2-Qwen3-0.6B \\
        --output_dir data/scored
    trl-qrpo build-offpolicy --dataset_name data/scored --mode best_worst --num_candidates 6 --output_dir data/train
    trl-qrpo evaluate --dataset_name data/test_prompts --model_name_or_path runs/qrpo \\
        --ref_model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --reward_model_name_or_path ... --output_dir eval/qrpo
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Literal

_DTYPES = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class DataArguments:
    """Where the input dataset comes from and where the result goes."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Input dataset: a Hub id, a folder written by `save_to_disk` (every `trl qrpo` command "
            "writes one), or a .json/.jsonl/.parquet/.csv file. Required."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (`name` of `datasets.load_dataset`)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read."})
    max_rows: int | None = field(
        default=None, metadata={"help": "Use only the first N rows, for quick trials (None: all rows)."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Output folder (`datasets.load_from_disk` reads it). Long commands write finished chunks "
            "there as they go: rerun the same command to resume after a crash. Required."
        },
    )
    output_file: str | None = field(
        default=None,
        metadata={"help": "Also export the result to this .json/.jsonl/.parquet/.csv file."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the result to the Hub as `hub_dataset_id`."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})


@dataclass
class ShardArguments:
    """Splitting the work across jobs, and the unit of resumption."""

    num_shards: int = field(
        default=1,
        metadata={"help": "Split the dataset into this many shards, one job each; merge them with `merge`."},
    )
    shard_index: int = field(default=0, metadata={"help": "The shard this job computes, in [0, num_shards)."})
    chunk_size: int = field(
        default=64,
        metadata={
            "help": "Rows per chunk: the unit written to disk and skipped on restart (shards are whole chunks)."
        },
    )


@dataclass
class ModelArguments:
    """The (reference or policy) model."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model id or folder (the reference model for `generate`). Required."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Model revision (None: the main branch)."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer id or folder (None: the model's)."}
    )
    dtype: _DTYPES = field(default="auto", metadata={"help": "Model dtype ('auto': the checkpoint's)."})
    device: str = field(default="auto", metadata={"help": "Device ('auto': CUDA when available, else CPU)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention implementation (e.g. sdpa, flash_attention_2; None: transformers' choice)."},
    )
    model_init_kwargs: str | None = field(
        default=None,
        metadata={"help": 'JSON dict of extra `from_pretrained` arguments, e.g. \'{"device_map": "auto"}\'.'},
    )


@dataclass
class SamplingArguments:
    """How completions are sampled. The defaults sample the model's own distribution, as exact quantiles require."""

    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (1.0 samples pi_ref itself)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0 disables it)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 disables it)."})
    min_p: float = field(default=0.0, metadata={"help": "Min-p sampling (0.0 disables it)."})
    max_new_tokens: int = field(
        default=512,
        metadata={"help": "Token limit per completion; completions that reach it are kept and flagged."},
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per `generate` call (transformers)."})
    backend: Literal["auto", "transformers", "vllm"] = field(
        default="auto",
        metadata={
            "help": "Generation backend: 'vllm', 'transformers', or 'auto' (vLLM when installed and a GPU is visible)."
        },
    )
    data_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Worker processes on this node, each with its own model copy on "
            "vllm_tensor_parallel_size GPUs, sharing the chunks."
        },
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor-parallel GPUs per model copy."})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Share of GPU memory vLLM may use."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM context length, prompt + completion (None: the model's)."}
    )
    vllm_enforce_eager: bool = field(
        default=False, metadata={"help": "Disable CUDA graphs in vLLM (less memory, slower)."}
    )
    vllm_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "JSON dict of any other `vllm.LLM(...)` arguments, e.g. '{\"enable_prefix_caching\": true}'."
        },
    )


@dataclass
class RewardArguments:
    """The reward: a sequence-classification reward model and/or reward functions, combined with weights."""

    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Sequence-classification reward model id or folder (None: reward functions only)."},
    )
    reward_tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "The reward model's tokenizer (None: the reward model's)."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions with TRL's signature f(prompts, completions, **kwargs) -> list[float]: "
            "import paths ('my_pkg.rewards.fn'; the current directory is importable) or TRL names "
            "(accuracy_reward, think_format_reward, ...)."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per reward: the reward model first, then the functions in order (None: 1 each)."
        },
    )
    reward_max_length: int | None = field(
        default=None,
        metadata={"help": "Reward-model tokens kept per text; truncations are reported (None: no limit)."},
    )
    reward_batch_size: int = field(default=8, metadata={"help": "Texts per reward-model forward pass."})
    reward_dtype: _DTYPES = field(default="auto", metadata={"help": "Reward-model dtype ('auto': the checkpoint's)."})
    reward_label_index: int = field(default=0, metadata={"help": "Logit used as the reward."})


@dataclass
class GenerateArguments(ModelArguments, SamplingArguments, ShardArguments, DataArguments):
    """`generate`: `num_generations` reference completions per prompt from the reference model."""

    num_generations: int = field(
        default=8, metadata={"help": "Reference completions per prompt (the paper: 50; training uses 1-3)."}
    )
    seed: int = field(default=42, metadata={"help": "Base seed; each completion's seed derives from it and its row."})


@dataclass
class ScoreArguments(RewardArguments, ShardArguments, DataArguments):
    """`score`: rewards of the dataset's completions and of every reference completion."""

    columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "Completion columns to score (None: every one of completion, chosen, rejected, "
            "ref_completions present)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy tokenizer, to pass `completion_ids` to reward functions."}
    )
    device: str = field(
        default="auto", metadata={"help": "Reward-model device ('auto': CUDA when available, else CPU)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom reward-model code."})


@dataclass
class BuildOffPolicyArguments(DataArguments):
    """`build-offpolicy`: training rows made from the reference completions (leave-one-out marked)."""

    mode: Literal["pointwise", "best_worst", "random_pairs"] = field(
        default="pointwise",
        metadata={
            "help": "'pointwise': one row per reference; 'best_worst': the best and worst candidates as a pair; "
            "'random_pairs': two random candidates as a pair."
        },
    )
    num_candidates: int | None = field(
        default=None,
        metadata={
            "help": "Use the first N references as training completions (the paper: best/worst of the first 6); "
            "all stay in ref_rewards (None: all references)."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of random_pairs (per row)."})
    drop_ties: bool = field(default=False, metadata={"help": "Drop pairs with equal rewards (count logged)."})
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes for datasets.map (None: the main process only)."}
    )


@dataclass
class MergeArguments:
    """`merge`: concatenate the outputs of a sharded run, checking that every shard is there once and complete."""

    shard_dirs: list[str] | None = field(
        default=None, metadata={"help": "Output folders of the shard jobs (any order). Required."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder for the merged dataset. Required."})
    output_file: str | None = field(
        default=None, metadata={"help": "Also export to this .json/.jsonl/.parquet/.csv file."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the merged dataset to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})


@dataclass
class EvaluateArguments(RewardArguments, ModelArguments, SamplingArguments, ShardArguments, DataArguments):
    """`evaluate`: reward, KL to the reference model and length of a policy's own samples."""

    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The reference model pi_ref (same tokenizer as the policy), for the KL estimate (None: no KL)."
        },
    )
    num_samples: int = field(default=1, metadata={"help": "Samples per prompt."})
    seed: int = field(default=0, metadata={"help": "Base seed (per row and sample)."})
    logprob_batch_size: int = field(default=8, metadata={"help": "Sequences per log-probability forward pass."})


def _setup_logging() -> None:
    logger = logging.getLogger("trl_qrpo")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _parse(cls, argv: list[str], prog: str):
    from trl import TrlParser

    parser = TrlParser(cls, prog=prog, description=cls.__doc__)
    (args,) = parser.parse_args_and_config(args=argv)
    required = [
        name
        for name in ("dataset_name", "output_dir", "model_name_or_path", "shard_dirs")
        if hasattr(args, name)
        and getattr(args, name) in (None, [])
        and not (name == "model_name_or_path" and cls is ScoreArguments)
    ]
    if required:
        parser.error(f"missing required argument(s): {', '.join('--' + r for r in required)}")
    _setup_logging()
    return args


def _json_dict(value, name: str) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{name} must be a JSON object, got {value!r}: {error}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--{name} must be a JSON object, got {value!r}.")
    return parsed


def _load(args):
    from trl_qrpo.reference import load_any_dataset

    dataset = load_any_dataset(args.dataset_name, args.dataset_config, args.dataset_split)
    if args.max_rows is not None:
        dataset = dataset.select(range(min(args.max_rows, len(dataset))))
    return dataset


def _finish(dataset, args, sharded: bool = False) -> None:
    from trl_qrpo.reference import save_any_dataset

    logger = logging.getLogger("trl_qrpo.precompute")
    if args.output_file:
        save_any_dataset(dataset, args.output_file)
        logger.info(f"Exported {len(dataset)} rows to {args.output_file}.")
    if args.push_to_hub:
        if sharded:
            logger.warning("Not pushing one shard to the Hub: merge the shards (`merge`) and push the result.")
        elif not args.hub_dataset_id:
            raise ValueError("--push_to_hub needs --hub_dataset_id.")
        else:
            dataset.push_to_hub(args.hub_dataset_id)
    logger.info(f"Wrote {len(dataset)} rows to {args.output_dir}.")


def _vllm_kwargs(args) -> dict:
    kwargs = {
        "tensor_parallel_size": args.vllm_tensor_parallel_size,
        "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
        "enforce_eager": args.vllm_enforce_eager,
    }
    if args.vllm_max_model_length is not None:
        kwargs["max_model_len"] = args.vllm_max_model_length
    kwargs.update(_json_dict(args.vllm_kwargs, "vllm_kwargs") or {})
    return kwargs


def _run(fn):
    """Report bad input (ValueError) as a one-line error with exit code 2 instead of a traceback."""

    def command(argv: list[str], prog: str) -> int:
        try:
            return fn(list(argv), prog)
        except ValueError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2

    command.__name__, command.__doc__ = fn.__name__, fn.__doc__
    return command


@_run
def generate_main(argv: list[str], prog: str = "trl qrpo generate") -> int:
    """Sample reference completions: see `GenerateArguments` and `trl_qrpo.reference.generate_references`."""
    from trl_qrpo.reference import generate_references

    args = _parse(GenerateArguments, argv, prog)
    dataset = generate_references(
        _load(args),
        args.model_name_or_path,
        args.tokenizer_name_or_path,
        num_generations=args.num_generations,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        backend=args.backend,
        output_dir=args.output_dir,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        revision=args.model_revision,
        attn_implementation=args.attn_implementation,
        model_init_kwargs=_json_dict(args.model_init_kwargs, "model_init_kwargs"),
        vllm_kwargs=_vllm_kwargs(args) if args.backend != "transformers" else None,
        data_parallel_size=args.data_parallel_size,
    )
    _finish(dataset, args, sharded=args.num_shards > 1)
    return 0


@_run
def score_main(argv: list[str], prog: str = "trl qrpo score") -> int:
    """Score completions and references: see `ScoreArguments` and `trl_qrpo.reference.score_dataset`."""
    from trl_qrpo.reference import score_dataset

    args = _parse(ScoreArguments, argv, prog)
    if args.reward_model_name_or_path is None and not args.reward_funcs:
        raise ValueError("Give a reward: --reward_model_name_or_path and/or --reward_funcs.")
    dataset = score_dataset(
        _load(args),
        args.reward_model_name_or_path,
        args.reward_funcs,
        args.reward_weights,
        columns=args.columns,
        reward_processing_class=args.reward_tokenizer_name_or_path,
        processing_class=args.tokenizer_name_or_path,
        max_length=args.reward_max_length,
        batch_size=args.reward_batch_size,
        dtype=args.reward_dtype,
        device=args.device,
        label_index=args.reward_label_index,
        trust_remote_code=args.trust_remote_code,
        output_dir=args.output_dir,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        chunk_size=args.chunk_size,
    )
    _finish(dataset, args, sharded=args.num_shards > 1)
    return 0


@_run
def build_offpolicy_main(argv: list[str], prog: str = "trl qrpo build-offpolicy") -> int:
    """Build off-policy training rows: see `BuildOffPolicyArguments` and `build_offpolicy_dataset`."""
    from trl_qrpo.reference import build_offpolicy_dataset

    args = _parse(BuildOffPolicyArguments, argv, prog)
    dataset = build_offpolicy_dataset(
        _load(args),
        args.mode,
        num_candidates=args.num_candidates,
        seed=args.seed,
        drop_ties=args.drop_ties,
        num_proc=args.num_proc,
    )
    dataset.save_to_disk(args.output_dir)
    _finish(dataset, args)
    return 0


@_run
def merge_main(argv: list[str], prog: str = "trl qrpo merge") -> int:
    """Merge shard outputs: see `MergeArguments` and `trl_qrpo.reference.merge_shards`."""
    from pathlib import Path

    from trl_qrpo.precompute.evaluate import SUMMARY_NAME
    from trl_qrpo.precompute.io import write_json
    from trl_qrpo.reference import merge_shards, read_manifest, summarize_evaluation

    args = _parse(MergeArguments, argv, prog)
    dataset = merge_shards(args.shard_dirs, args.output_dir)
    manifest = read_manifest(args.output_dir)
    if manifest.get("task") == "evaluate":
        summary = summarize_evaluation(dataset, meta=dict(manifest["params"], merged_from=manifest["merged_from"]))
        write_json(Path(args.output_dir) / SUMMARY_NAME, summary)
        print(json.dumps({k: v for k, v in summary.items() if k != "meta"}, indent=2))
    _finish(dataset, args)
    return 0


@_run
def evaluate_main(argv: list[str], prog: str = "trl qrpo evaluate") -> int:
    """Evaluate a policy's own samples: see `EvaluateArguments` and `trl_qrpo.reference.evaluate_policy`."""
    from trl_qrpo.reference import evaluate_policy

    args = _parse(EvaluateArguments, argv, prog)
    if args.data_parallel_size != 1:
        raise ValueError("evaluate has no --data_parallel_size: split the work with --num_shards/--shard_index.")
    if args.reward_model_name_or_path is None and not args.reward_funcs:
        raise ValueError("Give a reward: --reward_model_name_or_path and/or --reward_funcs.")
    samples, summary = evaluate_policy(
        _load(args),
        args.model_name_or_path,
        args.ref_model_name_or_path,
        args.tokenizer_name_or_path,
        reward_model=args.reward_model_name_or_path,
        reward_funcs=args.reward_funcs,
        reward_weights=args.reward_weights,
        reward_processing_class=args.reward_tokenizer_name_or_path,
        reward_max_length=args.reward_max_length,
        reward_batch_size=args.reward_batch_size,
        reward_dtype=args.reward_dtype,
        reward_label_index=args.reward_label_index,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        logprob_batch_size=args.logprob_batch_size,
        backend=args.backend,
        output_dir=args.output_dir,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        chunk_size=args.chunk_size,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        model_init_kwargs=_json_dict(args.model_init_kwargs, "model_init_kwargs"),
        vllm_kwargs=_vllm_kwargs(args) if args.backend != "transformers" else None,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "meta"}, indent=2))
    _finish(samples, args, sharded=args.num_shards > 1)
    return 0


SUBCOMMANDS = {
    "generate": generate_main,
    "score": score_main,
    "build-offpolicy": build_offpolicy_main,
    "merge": merge_main,
    "evaluate": evaluate_main,
}

# One-line help per subcommand, for the front end's listing.
HELP = {
    "generate": "Sample n reference completions per prompt from the reference model.",
    "score": "Score the dataset's completions and the reference completions (reward model and/or functions).",
    "build-offpolicy": "Build training rows from the reference completions (pointwise, best/worst or random pairs).",
    "merge": "Merge the outputs of a sharded generate/score/evaluate run.",
    "evaluate": "Reward, KL to the reference model and length of a policy's own samples.",
}


def main(argv: list[str] | None = None) -> int:
    """`python -m trl_qrpo.scripts.reference_cli <subcommand> ...` (the package's CLI routes here too)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        names = "\n".join(f"  {name:<16} {HELP[name]}" for name in SUBCOMMANDS)
        print(
            f"usage: reference_cli <subcommand> [--config file.yaml] [options]\n\nsubcommands:\n{names}",
            file=sys.stderr,
        )
        return 2
    return SUBCOMMANDS[argv[0]](argv[1:], f"reference_cli {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
