"""Options of the pre-computation phase as documented dataclasses, shared by the command line and the Python API.

Small groups of options, each a dataclass whose every field has help text and a documented default:

- [`DataArguments`]: where the input dataset comes from and where the result is exported (command line only).
- [`ShardArguments`]: the resumable run: `output_dir`, shards and chunks.
- [`ModelArguments`]: the (reference or policy) model and how it is loaded. The fields TRL's `ModelConfig` also has
  (`model_name_or_path`, `model_revision`, `dtype`, `attn_implementation`) keep its names and help texts.
- [`SamplingArguments`]: how completions are sampled (pi_ref's own distribution by default), and the backend.
- [`VLLMArguments`]: vLLM engine options, for the `vllm` backend.
- [`RewardArguments`]: the reward: a reward model and/or reward functions, combined with weights.

Each command's config ([`GenerateConfig`], [`ScoreConfig`], [`BuildOffPolicyConfig`], [`MergeConfig`],
[`EvaluateConfig`]) is made of the groups it needs, the way TRL's trainer configs are, and is what both
`trl qrpo <command>` parses (flags and `--config recipe.yaml`) and the matching function takes::

    from trl_qrpo.precompute import GenerateConfig, generate_references

    refs = generate_references(dataset, GenerateConfig(model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct", num_generations=8))

The functions read the groups they need from the config they are given (a `GenerateConfig` is a `SamplingArguments`,
a `ShardArguments`, ...), so an option is written once, here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..columns import COMPLETION_COLUMNS, REF_COMPLETIONS

DTYPES = ("auto", "float32", "bfloat16", "float16")
_Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def _trl_model_field(name: str, **overrides) -> Any:
    """A field of TRL's `ModelConfig`, with its help text (and, unless overridden, its default)."""
    from trl import ModelConfig

    source = ModelConfig.__dataclass_fields__[name]
    metadata = dict(source.metadata)
    if "help" in overrides:
        metadata["help"] = overrides.pop("help")
    default = overrides.pop("default", source.default)
    return field(default=default, metadata=metadata)


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


@dataclass
class DataArguments:
    """Where the input dataset comes from and where the result goes (the command line's input and export)."""

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
        default=None,
        metadata={"help": "Also export the result to this .json/.jsonl/.parquet/.csv file."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the result to the Hub as `hub_dataset_id`."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})

    def __post_init__(self):
        if getattr(super(), "__post_init__", None):
            super().__post_init__()
        # Checked before any work is done, not after hours of generation.
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("--push_to_hub needs --hub_dataset_id (the Hub dataset to create or update).")


@dataclass
class ShardArguments:
    """The resumable run: where finished chunks go, and how the work is split across jobs."""

    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Output folder (`datasets.load_from_disk` reads it). Finished chunks are written there as they "
            "go: rerun the same command to resume after a crash. Required on the command line; in Python, None "
            "keeps everything in memory (no resume)."
        },
    )
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
    """The (reference or policy) model and how it is loaded."""

    model_name_or_path: str | None = _trl_model_field(
        "model_name_or_path",
        help="Model id or folder (the reference model for `generate`, the policy for `evaluate`). Required.",
    )
    model_revision: str | None = _trl_model_field("model_revision", default=None)
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer id or folder (None: the model's)."}
    )
    dtype: _Dtype = _trl_model_field(
        "dtype", default="auto", help="Model dtype ('auto': the checkpoint's; float32, bfloat16, float16)."
    )
    device: str = field(default="auto", metadata={"help": "Device ('auto': CUDA when available, else CPU)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code."})
    attn_implementation: str | None = _trl_model_field("attn_implementation")
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": 'Extra `from_pretrained` arguments (a JSON dict), e.g. \'{"device_map": "auto"}\'.'},
    )

    def __post_init__(self):
        if getattr(super(), "__post_init__", None):
            super().__post_init__()
        self.model_init_kwargs = json_dict(self.model_init_kwargs, "model_init_kwargs")


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

    def __post_init__(self):
        if getattr(super(), "__post_init__", None):
            super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 (references are sampled, not decoded greedily), got {self.temperature}."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0 or not 0 <= self.min_p < 1:
            raise ValueError(
                f"top_k must be >= 0 (0 disables it) and min_p in [0, 1), got top_k={self.top_k}, min_p={self.min_p}."
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.backend not in ("auto", "transformers", "vllm"):
            raise ValueError(f"backend must be 'auto', 'transformers' or 'vllm', got {self.backend!r}.")

    @property
    def is_pure_sampling(self) -> bool:
        """Whether completions are drawn from the model's own distribution (temperature 1, no truncation)."""
        return (self.temperature, self.top_p, self.top_k, self.min_p) == (1.0, 1.0, 0, 0.0)


@dataclass
class VLLMArguments:
    """vLLM engine options (the `vllm` backend); `dtype`, `revision` and `trust_remote_code` come from the model's."""

    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor-parallel GPUs per model copy."})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Share of GPU memory vLLM may use."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM context length, prompt + completion (None: the model's)."}
    )
    vllm_enforce_eager: bool = field(
        default=False, metadata={"help": "Disable CUDA graphs in vLLM (less memory, slower)."}
    )
    vllm_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Any other `vllm.LLM(...)` arguments (a JSON dict), e.g. '{\"enable_prefix_caching\": true}'."
        },
    )

    def __post_init__(self):
        if getattr(super(), "__post_init__", None):
            super().__post_init__()
        self.vllm_kwargs = json_dict(self.vllm_kwargs, "vllm_kwargs")

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM(...)` from these options (`vllm_kwargs` last, so it wins)."""
        kwargs = {
            "tensor_parallel_size": self.vllm_tensor_parallel_size,
            "gpu_memory_utilization": self.vllm_gpu_memory_utilization,
            "enforce_eager": self.vllm_enforce_eager,
        }
        if self.vllm_max_model_length is not None:
            kwargs["max_model_len"] = self.vllm_max_model_length
        kwargs.update(self.vllm_kwargs or {})
        return kwargs


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
            "(accuracy_reward, think_format_reward, ...). In Python, callables too."
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
    reward_dtype: _Dtype = field(default="auto", metadata={"help": "Reward-model dtype ('auto': the checkpoint's)."})
    reward_label_index: int = field(default=0, metadata={"help": "Logit used as the reward."})
    reward_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra `from_pretrained` arguments of the reward model (a JSON dict)."}
    )

    def __post_init__(self):
        if getattr(super(), "__post_init__", None):
            super().__post_init__()
        self.reward_model_init_kwargs = json_dict(self.reward_model_init_kwargs, "reward_model_init_kwargs")
        if isinstance(self.reward_funcs, str) or callable(self.reward_funcs):
            self.reward_funcs = [self.reward_funcs]

    @property
    def has_reward(self) -> bool:
        return self.reward_model_name_or_path is not None or bool(self.reward_funcs)


@dataclass
class GenerateConfig(VLLMArguments, SamplingArguments, ModelArguments, ShardArguments, DataArguments):
    """`generate`: `num_generations` reference completions per prompt from the reference model pi_ref.

    Parameters: those of [`DataArguments`], [`ShardArguments`], [`ModelArguments`], [`SamplingArguments`] and
    [`VLLMArguments`], and:

        num_generations (`int`, *optional*, defaults to `8`):
            Reference completions per prompt (the paper generates 50 and trains with 1 to 3).
        seed (`int`, *optional*, defaults to `42`):
            Base seed; each completion's seed is derived from it, its row index and its sample index.
        data_parallel_size (`int`, *optional*, defaults to `1`):
            Worker processes on this node, each with its own model copy on `vllm_tensor_parallel_size` GPUs, sharing
            this shard's chunks. Needs `output_dir` and a model path.
    """

    num_generations: int = field(
        default=8, metadata={"help": "Reference completions per prompt (the paper: 50; training uses 1-3)."}
    )
    seed: int = field(default=42, metadata={"help": "Base seed; each completion's seed derives from it and its row."})
    data_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Worker processes on this node, each with its own model copy on "
            "vllm_tensor_parallel_size GPUs, sharing the chunks."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be at least 1, got {self.num_generations}.")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, got {self.data_parallel_size}.")


@dataclass
class ScoreConfig(VLLMArguments, RewardArguments, ShardArguments, DataArguments):
    """`score`: rewards of the dataset's completions and of every reference completion.

    Parameters: those of [`DataArguments`], [`ShardArguments`] and [`RewardArguments`], and:

        columns (`list[str]`, *optional*):
            Completion columns to score (None: every one of `completion`, `chosen`, `rejected`, `ref_completions`
            present).
        tokenizer_name_or_path (`str`, *optional*):
            The policy's tokenizer, to pass `completion_ids` to reward functions.
        device (`str`, *optional*, defaults to `"auto"`):
            Reward-model device.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow custom reward-model code.
        backend (`str`, *optional*, defaults to `"transformers"`):
            Reward-model backend: `"transformers"` or `"vllm"` (vLLM's pooling runner, with the options of
            [`VLLMArguments`]). Reward functions run in this process either way.
    """

    columns: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Completion columns to score (None: every one of {', '.join(COMPLETION_COLUMNS)}, "
            f"{REF_COMPLETIONS} present)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy tokenizer, to pass `completion_ids` to reward functions."}
    )
    device: str = field(
        default="auto", metadata={"help": "Reward-model device ('auto': CUDA when available, else CPU)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom reward-model code."})
    backend: Literal["transformers", "vllm"] = field(
        default="transformers",
        metadata={
            "help": "Reward-model backend: 'transformers', or 'vllm' (vLLM's pooling runner; the vllm_* options "
            "apply). Reward functions run in this process either way."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in ("transformers", "vllm"):
            raise ValueError(f"backend must be 'transformers' or 'vllm', got {self.backend!r}.")


@dataclass
class BuildOffPolicyConfig(DataArguments):
    """`build-offpolicy`: training rows made from the reference completions (leave-one-out marked).

    Parameters: those of [`DataArguments`], and:

        output_dir (`str`, *optional*): Folder for the training rows (`save_to_disk`). Required on the command line.
        mode (`str`, *optional*, defaults to `"pointwise"`): `"pointwise"`, `"best_worst"` or `"random_pairs"`.
        num_candidates (`int`, *optional*): Use the first N references as training completions.
        seed (`int`, *optional*, defaults to `42`): Seed of `random_pairs` (per row).
        drop_ties (`bool`, *optional*, defaults to `False`): Drop pairs with equal rewards (count logged).
        num_proc (`int`, *optional*): Processes for `datasets.map`.
    """

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
class EvaluateConfig(RewardArguments, VLLMArguments, SamplingArguments, ModelArguments, ShardArguments, DataArguments):
    """`evaluate`: reward, KL to the reference model and length of a policy's own samples.

    Parameters: those of [`DataArguments`], [`ShardArguments`], [`ModelArguments`] (the policy; the reference model
    is loaded the same way), [`SamplingArguments`], [`VLLMArguments`] and [`RewardArguments`], and:

        ref_model_name_or_path (`str`, *optional*):
            The reference model pi_ref (same tokenizer as the policy), for the KL estimate (None: no KL).
        num_samples (`int`, *optional*, defaults to `1`):
            Samples per prompt (the paper: 1 per prompt, 3 seeds).
        seed (`int`, *optional*, defaults to `0`):
            Base seed (per row and sample, as in `generate`).
        logprob_batch_size (`int`, *optional*, defaults to `8`):
            Sequences per log-probability forward pass.
    """

    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The reference model pi_ref (same tokenizer as the policy), for the KL estimate (None: no KL)."
        },
    )
    num_samples: int = field(default=1, metadata={"help": "Samples per prompt."})
    seed: int = field(default=0, metadata={"help": "Base seed (per row and sample)."})
    logprob_batch_size: int = field(default=8, metadata={"help": "Sequences per log-probability forward pass."})

    def __post_init__(self):
        super().__post_init__()
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}.")
