"""Options of the pre-computation commands, as TRL builds its configs: one flat, documented dataclass per command.

Each command's config ([`GenerateConfig`], [`ScoreConfig`], [`BuildOffPolicyConfig`], [`MergeConfig`],
[`EvaluateConfig`]) lists every option its function uses, the way TRL's `GRPOConfig` lists its generation and vLLM
options, and is what both `trl qrpo <command>` parses and the function takes::

    from trl_qrpo.precompute import GenerateConfig, generate_references

    refs = generate_references(dataset, GenerateConfig(model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct", num_generations=8))

On the command line the config is parsed together with [`DataArguments`] (where the input comes from and where the
result is exported), as TRL's scripts parse their `ScriptArguments` beside the trainer's config: `TrlParser((
DataArguments, GenerateConfig))`.

An option that several commands share (the model, sampling, vLLM, reward and resumable-run options) has its default
and help text written once, in :data:`OPTIONS`; each config declares the options it takes with :func:`option` and
checks them in its `__post_init__` with the shared checks below. The fields TRL's `ModelConfig` also has
(`model_name_or_path`, `model_revision`, `dtype`, `attn_implementation`) keep its names and help texts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..columns import COMPLETION_COLUMNS, REF_COMPLETIONS

_Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def _trl_model_help(name: str) -> str:
    from trl import ModelConfig

    return ModelConfig.__dataclass_fields__[name].metadata["help"]


# name -> (default, help). Mutable defaults are given as a zero-argument callable (a default factory).
OPTIONS: dict[str, tuple[Any, str]] = {
    # ---- the resumable run
    "output_dir": (
        None,
        "Output folder (`datasets.load_from_disk` reads it). Finished chunks are written there as they go: rerun "
        "the same command to resume after a crash. Required on the command line; in Python, None keeps everything "
        "in memory (no resume).",
    ),
    "num_shards": (1, "Split the dataset into this many shards, one job each; merge them with `merge`."),
    "shard_index": (0, "The shard this job computes, in [0, num_shards)."),
    "chunk_size": (64, "Rows per chunk: the unit written to disk and skipped on restart (shards are whole chunks)."),
    # ---- the (reference or policy) model
    "model_name_or_path": (
        None,
        "Model id or folder (the reference model for `generate`, the policy for `evaluate`). Required.",
    ),
    "model_revision": (None, "revision"),  # help: TRL's ModelConfig
    "tokenizer_name_or_path": (None, "Tokenizer id or folder (None: the model's)."),
    "dtype": ("auto", "Model dtype ('auto': the checkpoint's; float32, bfloat16, float16)."),
    "device": (
        "auto",
        "Device ('auto': the device accelerate gives this process: its GPU when there is one, else CPU).",
    ),
    "trust_remote_code": (False, "Allow custom model code."),
    "attn_implementation": (None, "attn_implementation"),  # help: TRL's ModelConfig
    "model_init_kwargs": (
        None,
        'Extra `from_pretrained` arguments (a JSON dict), e.g. \'{"device_map": "auto"}\'.',
    ),
    # ---- sampling
    "temperature": (1.0, "Sampling temperature (1.0 samples the model's own distribution, as exact quantiles need)."),
    "top_p": (1.0, "Nucleus sampling threshold (1.0 disables it)."),
    "top_k": (0, "Top-k sampling (0 disables it)."),
    "min_p": (0.0, "Min-p sampling (0.0 disables it)."),
    "max_new_tokens": (512, "Token limit per completion; completions that reach it are kept and flagged."),
    "batch_size": (16, "Sequences per `generate` call (transformers backend)."),
    "backend": (
        "auto",
        "Generation backend: 'vllm', 'transformers', or 'auto' (vLLM when installed and a GPU is visible).",
    ),
    # ---- the vLLM engine (dtype, revision and trust_remote_code come from the model's options)
    "vllm_tensor_parallel_size": (1, "vLLM tensor-parallel GPUs per model copy."),
    "vllm_gpu_memory_utilization": (0.9, "Share of GPU memory vLLM may use."),
    "vllm_max_model_length": (None, "vLLM context length, prompt + completion (None: the model's)."),
    "vllm_enforce_eager": (False, "Disable CUDA graphs in vLLM (less memory, slower)."),
    "vllm_kwargs": (
        None,
        "Any other `vllm.LLM(...)` arguments (a JSON dict), e.g. '{\"enable_prefix_caching\": true}'.",
    ),
    # ---- the reward
    "reward_model_name_or_path": (
        None,
        "Sequence-classification reward model id or folder (None: reward functions only).",
    ),
    "reward_tokenizer_name_or_path": (None, "The reward model's tokenizer (None: the reward model's)."),
    "reward_funcs": (
        None,
        "Reward functions with TRL's signature f(prompts, completions, **kwargs) -> list[float]: import paths "
        "('my_pkg.rewards.fn'; the current directory is importable) or TRL names (accuracy_reward, "
        "think_format_reward, ...). In Python, callables too.",
    ),
    "reward_weights": (
        None,
        "One weight per reward: the reward model first, then the functions in order (None: 1 each).",
    ),
    "reward_max_length": (None, "Reward-model tokens kept per text; truncations are reported (None: no limit)."),
    "reward_batch_size": (8, "Texts per reward-model forward pass."),
    "reward_dtype": ("auto", "Reward-model dtype ('auto': the checkpoint's)."),
    "reward_label_index": (0, "Logit used as the reward."),
    "reward_model_init_kwargs": (None, "Extra `from_pretrained` arguments of the reward model (a JSON dict)."),
}
_TRL_MODEL_HELP = ("model_revision", "attn_implementation")


def option(name: str, **overrides) -> Any:
    """The dataclass field of a shared option: its default and help text from :data:`OPTIONS` (or `overrides`)."""
    default, help_text = OPTIONS[name]
    if name in _TRL_MODEL_HELP:
        help_text = _trl_model_help(name)
    default = overrides.pop("default", default)
    help_text = overrides.pop("help", help_text)
    if overrides:
        raise TypeError(f"option({name!r}) takes only default= and help=, got {sorted(overrides)}")
    if callable(default):
        return field(default_factory=default, metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


def json_dict(value, name: str) -> dict | None:
    """A dict option given as a dict (Python, YAML) or as a JSON string (command line); `None` stays `None`."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} must be a JSON object, got {value!r}: {error}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}.")
    return parsed


# ---------------------------------------------------------------------------------------------------------------------
# Checks shared by the configs (each reads only the fields its group names)
# ---------------------------------------------------------------------------------------------------------------------


def _at_least(config, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}.")


def _check_model(config) -> None:
    config.model_init_kwargs = json_dict(config.model_init_kwargs, "model_init_kwargs")


def _check_sampling(config) -> None:
    if not config.temperature > 0:
        raise ValueError(
            f"temperature must be > 0 (completions are sampled, not decoded greedily), got {config.temperature}."
        )
    if not 0 < config.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {config.top_p}.")
    if config.top_k < 0 or not 0 <= config.min_p < 1:
        raise ValueError(
            f"top_k must be >= 0 (0 disables it) and min_p in [0, 1), got top_k={config.top_k}, min_p={config.min_p}."
        )
    _at_least(config, 1, "max_new_tokens", "batch_size")
    if config.backend not in ("auto", "transformers", "vllm"):
        raise ValueError(f"backend must be 'auto', 'transformers' or 'vllm', got {config.backend!r}.")


def _check_vllm(config) -> None:
    config.vllm_kwargs = json_dict(config.vllm_kwargs, "vllm_kwargs")


def _check_reward(config) -> None:
    config.reward_model_init_kwargs = json_dict(config.reward_model_init_kwargs, "reward_model_init_kwargs")
    if isinstance(config.reward_funcs, str) or callable(config.reward_funcs):
        config.reward_funcs = [config.reward_funcs]


def is_pure_sampling(config) -> bool:
    """Whether a config samples the model's own distribution (temperature 1, no top-p/top-k/min-p truncation)."""
    return (config.temperature, config.top_p, config.top_k, config.min_p) == (1.0, 1.0, 0, 0.0)


def has_reward(config) -> bool:
    """Whether a config names a reward: a reward model and/or reward functions."""
    return config.reward_model_name_or_path is not None or bool(config.reward_funcs)


def llm_kwargs(config) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` from a config's `vllm_*` options (`vllm_kwargs` last, so it wins)."""
    kwargs = {
        "tensor_parallel_size": config.vllm_tensor_parallel_size,
        "gpu_memory_utilization": config.vllm_gpu_memory_utilization,
        "enforce_eager": config.vllm_enforce_eager,
    }
    if config.vllm_max_model_length is not None:
        kwargs["max_model_len"] = config.vllm_max_model_length
    kwargs.update(config.vllm_kwargs or {})
    return kwargs


# ---------------------------------------------------------------------------------------------------------------------
# The command line's input and export (parsed beside each command's config)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Where a command's input dataset comes from and where its result is exported (the command line only)."""

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
    output_file: str | None = field(
        default=None, metadata={"help": "Also export the result to this .json/.jsonl/.parquet/.csv file."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the result to the Hub as `hub_dataset_id`."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})

    def __post_init__(self):
        # Checked before any work is done, not after hours of generation.
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("--push_to_hub needs --hub_dataset_id (the Hub dataset to create or update).")


# ---------------------------------------------------------------------------------------------------------------------
# One config per command
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class GenerateConfig:
    """`generate`: `num_generations` reference completions per prompt from the reference model pi_ref.

    The defaults sample the model's own distribution (temperature 1, no truncation), as exact quantiles require.
    Every field's help text says what it does (`trl qrpo generate --help`).
    """

    # the resumable run
    output_dir: str | None = option("output_dir")
    num_shards: int = option("num_shards")
    shard_index: int = option("shard_index")
    chunk_size: int = option("chunk_size")
    # the reference model
    model_name_or_path: str | None = option("model_name_or_path")
    model_revision: str | None = option("model_revision")
    tokenizer_name_or_path: str | None = option("tokenizer_name_or_path")
    dtype: _Dtype = option("dtype")
    device: str = option("device")
    trust_remote_code: bool = option("trust_remote_code")
    attn_implementation: str | None = option("attn_implementation")
    model_init_kwargs: dict[str, Any] | str | None = option("model_init_kwargs")
    # sampling
    temperature: float = option("temperature")
    top_p: float = option("top_p")
    top_k: int = option("top_k")
    min_p: float = option("min_p")
    max_new_tokens: int = option("max_new_tokens")
    batch_size: int = option("batch_size")
    backend: Literal["auto", "transformers", "vllm"] = option("backend")
    vllm_tensor_parallel_size: int = option("vllm_tensor_parallel_size")
    vllm_gpu_memory_utilization: float = option("vllm_gpu_memory_utilization")
    vllm_max_model_length: int | None = option("vllm_max_model_length")
    vllm_enforce_eager: bool = option("vllm_enforce_eager")
    vllm_kwargs: dict[str, Any] | str | None = option("vllm_kwargs")
    # generate's own
    num_generations: int = field(
        default=8, metadata={"help": "Reference completions per prompt (the paper: 50; training uses 1-3)."}
    )
    seed: int = field(default=42, metadata={"help": "Base seed; each completion's seed derives from it and its row."})
    data_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Worker processes on this node, each with its own model copy on vllm_tensor_parallel_size GPUs, "
            "sharing the chunks. Needs output_dir and a model path."
        },
    )

    def __post_init__(self):
        _check_model(self)
        _check_sampling(self)
        _check_vllm(self)
        _at_least(self, 1, "num_generations", "data_parallel_size")


@dataclass
class ScoreConfig:
    """`score`: rewards of the dataset's completions and of every reference completion.

    A reward model and/or reward functions, combined with weights; reward functions run in this process whatever
    the reward model's backend. Every field's help text says what it does (`trl qrpo score --help`).
    """

    # the resumable run
    output_dir: str | None = option("output_dir")
    num_shards: int = option("num_shards")
    shard_index: int = option("shard_index")
    chunk_size: int = option("chunk_size")
    # the reward
    reward_model_name_or_path: str | None = option("reward_model_name_or_path")
    reward_tokenizer_name_or_path: str | None = option("reward_tokenizer_name_or_path")
    reward_funcs: list[str] | None = option("reward_funcs")
    reward_weights: list[float] | None = option("reward_weights")
    reward_max_length: int | None = option("reward_max_length")
    reward_batch_size: int = option("reward_batch_size")
    reward_dtype: _Dtype = option("reward_dtype")
    reward_label_index: int = option("reward_label_index")
    reward_model_init_kwargs: dict[str, Any] | str | None = option("reward_model_init_kwargs")
    device: str = option("device", help="Reward-model device ('auto': CUDA when available, else CPU).")
    trust_remote_code: bool = option("trust_remote_code", help="Allow custom reward-model code.")
    backend: Literal["transformers", "vllm"] = option(
        "backend",
        default="transformers",
        help="Reward-model backend: 'transformers', or 'vllm' (vLLM's pooling runner; the vllm_* options apply). "
        "Reward functions run in this process either way.",
    )
    vllm_tensor_parallel_size: int = option("vllm_tensor_parallel_size")
    vllm_gpu_memory_utilization: float = option("vllm_gpu_memory_utilization")
    vllm_max_model_length: int | None = option("vllm_max_model_length")
    vllm_enforce_eager: bool = option("vllm_enforce_eager")
    vllm_kwargs: dict[str, Any] | str | None = option("vllm_kwargs")
    # score's own
    columns: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Completion columns to score (None: every one of {', '.join(COMPLETION_COLUMNS)}, "
            f"{REF_COMPLETIONS} present)."
        },
    )
    tokenizer_name_or_path: str | None = option(
        "tokenizer_name_or_path", help="Policy tokenizer, to pass `completion_ids` to reward functions."
    )

    def __post_init__(self):
        _check_reward(self)
        _check_vllm(self)
        if self.backend not in ("transformers", "vllm"):
            raise ValueError(f"backend must be 'transformers' or 'vllm', got {self.backend!r}.")


@dataclass
class BuildOffPolicyConfig:
    """`build-offpolicy`: training rows made from the reference completions (leave-one-out marked)."""

    output_dir: str | None = field(default=None, metadata={"help": "Folder for the training rows. Required."})
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
class RefLogpsConfig:
    """`ref-logps`: pi_ref's log-probability of every completion of a dataset, as training computes it.

    For rows no sampler produced (a user's chosen/rejected data, completions of another model): the reference model
    scores each completion column with the trainer's own tokenisation, truncation and float32 sums, and the rows then
    train with no reference model. Rows from `generate` carry these log-probs already. Every field's help text says
    what it does (`trl qrpo ref-logps --help`).
    """

    # the resumable run
    output_dir: str | None = option("output_dir")
    num_shards: int = option("num_shards")
    shard_index: int = option("shard_index")
    chunk_size: int = option("chunk_size")
    # the reference model
    model_name_or_path: str | None = option(
        "model_name_or_path", help="The reference model pi_ref (the model training starts from). Required."
    )
    model_revision: str | None = option("model_revision")
    tokenizer_name_or_path: str | None = option("tokenizer_name_or_path")
    dtype: _Dtype = option("dtype")
    device: str = option("device")
    trust_remote_code: bool = option("trust_remote_code")
    attn_implementation: str | None = option("attn_implementation")
    model_init_kwargs: dict[str, Any] | str | None = option("model_init_kwargs")
    # what training will do with the sequences
    max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate prompt + completion to this many tokens: the `max_length` training will use."},
    )
    truncation_mode: Literal["keep_start", "keep_end"] = field(
        default="keep_start", metadata={"help": "The `truncation_mode` training will use."}
    )
    columns: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Completion columns to score (None: every one of {', '.join(COMPLETION_COLUMNS)} present)."
        },
    )
    logprob_batch_size: int = field(default=8, metadata={"help": "Sequences per log-probability forward pass."})

    def __post_init__(self):
        _check_model(self)
        _at_least(self, 1, "logprob_batch_size")


@dataclass
class MergeConfig:
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

    def __post_init__(self):
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("--push_to_hub needs --hub_dataset_id (the Hub dataset to create or update).")


@dataclass
class EvaluateConfig:
    """`evaluate`: reward, KL to the reference model and length of a policy's own samples.

    The reference model is loaded with the policy's loading options. Every field's help text says what it does
    (`trl qrpo evaluate --help`).
    """

    # the resumable run
    output_dir: str | None = option("output_dir")
    num_shards: int = option("num_shards")
    shard_index: int = option("shard_index")
    chunk_size: int = option("chunk_size")
    # the policy (and how the reference model is loaded)
    model_name_or_path: str | None = option("model_name_or_path")
    model_revision: str | None = option("model_revision")
    tokenizer_name_or_path: str | None = option("tokenizer_name_or_path")
    dtype: _Dtype = option("dtype")
    device: str = option("device")
    trust_remote_code: bool = option("trust_remote_code")
    attn_implementation: str | None = option("attn_implementation")
    model_init_kwargs: dict[str, Any] | str | None = option("model_init_kwargs")
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The reference model pi_ref (same tokenizer as the policy), for the KL estimate (None: no KL)."
        },
    )
    # sampling
    temperature: float = option("temperature")
    top_p: float = option("top_p")
    top_k: int = option("top_k")
    min_p: float = option("min_p")
    max_new_tokens: int = option("max_new_tokens")
    batch_size: int = option("batch_size")
    backend: Literal["auto", "transformers", "vllm"] = option("backend")
    vllm_tensor_parallel_size: int = option("vllm_tensor_parallel_size")
    vllm_gpu_memory_utilization: float = option("vllm_gpu_memory_utilization")
    vllm_max_model_length: int | None = option("vllm_max_model_length")
    vllm_enforce_eager: bool = option("vllm_enforce_eager")
    vllm_kwargs: dict[str, Any] | str | None = option("vllm_kwargs")
    # the reward
    reward_model_name_or_path: str | None = option("reward_model_name_or_path")
    reward_tokenizer_name_or_path: str | None = option("reward_tokenizer_name_or_path")
    reward_funcs: list[str] | None = option("reward_funcs")
    reward_weights: list[float] | None = option("reward_weights")
    reward_max_length: int | None = option("reward_max_length")
    reward_batch_size: int = option("reward_batch_size")
    reward_dtype: _Dtype = option("reward_dtype")
    reward_label_index: int = option("reward_label_index")
    reward_model_init_kwargs: dict[str, Any] | str | None = option("reward_model_init_kwargs")
    # evaluate's own
    num_samples: int = field(default=1, metadata={"help": "Samples per prompt."})
    seed: int = field(default=0, metadata={"help": "Base seed (per row and sample)."})
    logprob_batch_size: int = field(default=8, metadata={"help": "Sequences per log-probability forward pass."})

    def __post_init__(self):
        _check_model(self)
        _check_sampling(self)
        _check_reward(self)
        _check_vllm(self)
        _at_least(self, 1, "num_samples")
