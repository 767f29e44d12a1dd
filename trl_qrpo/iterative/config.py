"""`IterateConfig`: the options of iterative QRPO (`trl qrpo iterate --config iterate.yaml`), one documented dataclass.

The top-level fields say what iterates (the starting model, the prompts, how many rounds, which reference); each stage's
own options are a mapping named after its command, written as that command takes them::

    model_name_or_path: outputs/quickstart/SmolLM2-135M-Instruct
    dataset_name: recipes/quickstart/prompts.jsonl
    eval_dataset_name: recipes/quickstart/eval_prompts.jsonl
    output_dir: outputs/iterative
    num_rounds: 3
    generate: {num_generations: 4, max_new_tokens: 48, dtype: float32}
    score: {reward_funcs: [trl_qrpo.rewards.vader_sentiment]}
    build_offpolicy: {mode: pointwise}
    train: {beta: 0.05, learning_rate: 6.0e-5, ...}     # as in `trl qrpo --config` (accelerate's keys too)
    evaluate: {num_samples: 4, max_new_tokens: 48}

The options a round sets itself (which model, which data, which folder) are refused in the sections: a round's
reference and the samples its quantiles are taken among follow from `anchored`, never from a path a user could
point at the wrong model's samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ..precompute.config import json_dict

# Options each stage gets from the round, never from its section (the section names them only by mistake).
OWNED_OPTIONS = {
    "generate": ("model_name_or_path", "dataset_name", "output_dir", "num_shards", "shard_index", "seed"),
    "score": ("dataset_name", "output_dir", "num_shards", "shard_index", "columns"),
    "build_offpolicy": ("dataset_name", "output_dir"),
    "ref_logps": ("model_name_or_path", "dataset_name", "output_dir", "num_shards", "shard_index", "columns"),
    "train": (
        "model_name_or_path",
        "ref_model_name_or_path",
        "dataset_name",
        "datasets",
        "dataset_train_split",
        "output_dir",
        "precompute_ref_log_probs",
    ),
    "evaluate": ("model_name_or_path", "ref_model_name_or_path", "dataset_name", "output_dir", "num_shards"),
}
SECTIONS = tuple(OWNED_OPTIONS)
# Sampling settings that make a sample something other than a draw from the model: quantiles would not be uniform.
_PURE_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


@dataclass
class IterateConfig:
    """Iterative QRPO: `num_rounds` rounds of generate, score, build rows, train and evaluate.

    In round r (from 0) the current policy (round 0: the starting model) samples completions for the round's prompts,
    the reward scores them, training rows are built from them, QRPO trains the policy from that round's reference,
    and `evaluate` measures the new policy on held-out prompts. Every stage is the `trl qrpo` command of the same name
    (training: `trl qrpo --config`), with its options from its section; each writes one folder,
    `output_dir/round-<r>/<stage>`. A run that stops resumes at the stage where it stopped.

    Every field's help text says what it does (`trl qrpo iterate --help`).
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The starting model (round 0's policy and reference): a Hub id or a folder."}
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the run: one sub-folder per round and stage, the summary. Rerun to resume."},
    )
    num_rounds: int = field(default=2, metadata={"help": "Rounds of generate, score, train and evaluate."})
    anchored: bool = field(
        default=False,
        metadata={
            "help": "False: each round's reference is the last round's policy (its samples are draws from it: exact "
            "quantiles, log-probs from the sampler). True: every round is regularised towards the starting model; a "
            "round's samples are then off-policy rows whose quantiles are taken among the starting model's own "
            "references (sampled once, in round 0) and whose log-probs under it come from `ref-logps`."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training prompts (`prompt` column): a Hub id, a save_to_disk folder or a data file."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of dataset_name."})
    dataset_split: str = field(default="train", metadata={"help": "Split of dataset_name to read."})
    prompts_per_round: int | None = field(
        default=None,
        metadata={
            "help": "None: every prompt in every round. N: fresh prompts each round, rows [r*N, (r+1)*N) in round r "
            "(the data set needs num_rounds x N rows)."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out prompts for `evaluate` after each round (None: no evaluation, no summary plot)."},
    )
    eval_dataset_split: str = field(default="train", metadata={"help": "Split of eval_dataset_name to read."})
    evaluate_start: bool = field(
        default=True, metadata={"help": "Also evaluate the starting model once: the summary's first point (KL 0)."}
    )
    stage_processes: bool = field(
        default=True,
        metadata={
            "help": "True: each stage runs as its `trl qrpo` command in a new process (GPU memory freed between "
            "stages; training under `accelerate launch` with the train section's accelerate options). False: the "
            "same commands run in this process (small models, notebooks, tests)."
        },
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the run: round r samples with seed + r (new draws each round), and training uses it "
            "unless the train section sets its own `seed`."
        },
    )
    generate: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "`generate`'s options (GenerateConfig fields), as a mapping (YAML) or a JSON object."},
    )
    score: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "`score`'s options (ScoreConfig fields): the reward. Required."}
    )
    build_offpolicy: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "`build-offpolicy`'s options (BuildOffPolicyConfig fields; default mode: pointwise, every sample "
            "a row). Pairs: mode best_worst or random_pairs."
        },
    )
    ref_logps: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "`ref-logps`'s options (RefLogpsConfig fields), for anchored rounds and the KL to a round's "
            "reference (default: the generate section's model loading options)."
        },
    )
    train: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Training options, as in `trl qrpo --config` (QRPOConfig, ModelConfig and accelerate's keys)."
        },
    )
    evaluate: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "`evaluate`'s options (EvaluateConfig fields; the reward defaults to the score section's). The "
            "reference of its KL is the starting model."
        },
    )

    def __post_init__(self):
        for name in SECTIONS:
            section = json_dict(getattr(self, name), name)
            section = dict(section or {})
            owned = [key for key in OWNED_OPTIONS[name] if key in section]
            if owned:
                raise ValueError(
                    f"The '{name}' section sets {', '.join(owned)}: each round sets these itself (the model, the data "
                    f"and the folder of its stage follow from the round and `anchored`). Remove them from '{name}'."
                )
            try:
                yaml.safe_dump(section)
            except yaml.YAMLError as error:
                raise ValueError(
                    f"The '{name}' section holds a value that a stage's --config YAML cannot ({error}): each stage "
                    "runs its command from YAML. Give reward functions by import path ('my_pkg.rewards.fn'), not as "
                    "Python objects."
                ) from None
            setattr(self, name, section)
        impure = {k: v for k, v in self.generate.items() if k in _PURE_SAMPLING and v != _PURE_SAMPLING[k]}
        if impure:
            raise ValueError(
                f"The 'generate' section sets {impure}: iterative QRPO needs each round's samples to be draws from the "
                "round's policy itself (temperature 1, no top_p/top_k/min_p), or their quantiles are not uniform and "
                "log Z is not exact. Remove these options."
            )
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be at least 1, got {self.num_rounds}.")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ValueError(
                f"prompts_per_round must be at least 1 (or None: all prompts), got {self.prompts_per_round}."
            )
        if not (self.score.get("reward_model_name_or_path") or self.score.get("reward_funcs")):
            raise ValueError("The 'score' section needs a reward: reward_model_name_or_path and/or reward_funcs.")
