"""The stages of an iterative QRPO run, in order: which command, with which options, writing which folder.

Nothing here runs anything: :func:`plan_stages` turns an [`IterateConfig`] into the list of [`Stage`]s that
:mod:`.run` executes, so that what each round samples from, trains from and is regularised towards can be read (and
tested) before any model loads. The rules:

- round r's policy starts from round r-1's policy (round 0: the starting model) and samples the round's completions;
- its reference is that same policy (`anchored: false`), or the starting model in every round (`anchored: true`);
- the reference rewards a round's quantiles are taken among are samples of that reference: the round's own samples
  (not anchored, or round 0), or the starting model's round-0 samples of the same prompt (anchored rounds r >= 1);
- the reference log-probs come from the sampler when it was the reference, else from `ref-logps` under the reference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import IterateConfig

# The folders of a round, under output_dir/round-<r>/.
PROMPTS, GENERATE, SCORE, TRAIN_DATA, REF_LOGPS, POLICY, EVALUATE, EVALUATE_REF_LOGPS = (
    "prompts",
    "generate",
    "score",
    "train-data",
    "ref-logps",
    "policy",
    "evaluate",
    "evaluate-ref-logps",
)
START = "start"
# Model-loading options `ref-logps` takes from the generate section when its own section does not set them.
_LOADING_OPTIONS = ("dtype", "device", "trust_remote_code", "attn_implementation", "model_init_kwargs")
# Options of the score section that `evaluate` takes as its reward when its section names none.
_REWARD_OPTIONS = (
    "reward_model_name_or_path",
    "reward_tokenizer_name_or_path",
    "reward_funcs",
    "reward_weights",
    "reward_max_length",
    "reward_batch_size",
    "reward_dtype",
    "reward_label_index",
    "reward_model_init_kwargs",
)


@dataclass(frozen=True)
class Stage:
    """One step of the run.

    Attributes:
        name: `round-<r>/<folder>` (or `start/evaluate`), the key of the run's state file.
        command: the `trl qrpo` command (`generate`, `score`, `ref-logps`, `evaluate`, `train` for `trl qrpo
            --config`), or one of the run's own model-free steps (`prompts`, `build-offpolicy`).
        options: what the command reads (its `--config` YAML), `output_dir` included.
        round: the round (None for the starting model's evaluation).
    """

    name: str
    command: str
    options: dict[str, Any] = field(hash=False)
    round: int | None = None

    @property
    def output_dir(self) -> str:
        return self.options["output_dir"]

    def fingerprint(self) -> str:
        """A hash of the command and its options: a finished stage is reused only with the same fingerprint."""
        text = json.dumps([self.command, self.options], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def round_dir(config: IterateConfig, r: int) -> Path:
    return Path(config.output_dir) / f"round-{r}"


def policy_of(config: IterateConfig, r: int) -> str:
    """The policy that round r trains (its `policy` folder)."""
    return str(round_dir(config, r) / POLICY)


def start_policy(config: IterateConfig, r: int) -> str:
    """The model round r starts from and samples with: the last round's policy (round 0: the starting model)."""
    return config.model_name_or_path if r == 0 else policy_of(config, r - 1)


def reference_of(config: IterateConfig, r: int) -> str:
    """Round r's reference model: the model it starts from, or the starting model when anchored."""
    return config.model_name_or_path if config.anchored else start_policy(config, r)


def prompt_rows(config: IterateConfig, r: int, num_prompts: int | None = None) -> list[int] | None:
    """The prompt rows round r samples for (None: all of them).

    With `prompts_per_round` N, round r takes rows [r*N, (r+1)*N). Anchored, round 0 samples the starting model's
    references for the prompts of every round at once (they are what later rounds' quantiles are taken among).
    """
    n = config.prompts_per_round
    if n is None:
        return None
    if config.anchored and r == 0:
        return list(range(config.num_rounds * n))
    return list(range(r * n, (r + 1) * n))


def _section(config: IterateConfig, name: str) -> dict[str, Any]:
    return dict(getattr(config, name))


def _default_max_length(name: str):
    from ..config import QRPOConfig

    return QRPOConfig.__dataclass_fields__[name].default


def _ref_logps_options(config: IterateConfig, model: str, dataset: str, output_dir: str, **extra) -> dict[str, Any]:
    options = {k: v for k, v in _section(config, "generate").items() if k in _LOADING_OPTIONS}
    options.update(_section(config, "ref_logps"))
    options.update(model_name_or_path=model, dataset_name=dataset, output_dir=output_dir, **extra)
    return options


def evaluate_options(config: IterateConfig, model: str, output_dir: str) -> dict[str, Any]:
    """`evaluate` of `model` on the held-out prompts, its KL taken to the starting model."""
    options = _section(config, "evaluate")
    if not any(options.get(k) for k in ("reward_model_name_or_path", "reward_funcs")):
        options.update({k: v for k, v in _section(config, "score").items() if k in _REWARD_OPTIONS})
    options.update(
        model_name_or_path=model,
        dataset_name=config.eval_dataset_name,
        dataset_split=config.eval_dataset_split,
        output_dir=output_dir,
    )
    if model != config.model_name_or_path:
        options["ref_model_name_or_path"] = config.model_name_or_path
    return options


def round_stages(config: IterateConfig, r: int) -> list[Stage]:
    """The stages of round r, in order."""
    folder = round_dir(config, r)
    path = {name: str(folder / name) for name in (PROMPTS, GENERATE, SCORE, TRAIN_DATA, REF_LOGPS, POLICY)}
    policy, reference = start_policy(config, r), reference_of(config, r)
    anchored_round = config.anchored and r > 0
    stages = [
        Stage(
            f"round-{r}/{PROMPTS}",
            "prompts",
            {
                "dataset_name": config.dataset_name,
                "dataset_config": config.dataset_config,
                "dataset_split": config.dataset_split,
                "rows": prompt_rows(config, r),
                "output_dir": path[PROMPTS],
            },
            r,
        ),
        Stage(
            f"round-{r}/{GENERATE}",
            "generate",
            {
                **_section(config, "generate"),
                "model_name_or_path": policy,
                "dataset_name": path[PROMPTS],
                "seed": config.seed + r,
                "output_dir": path[GENERATE],
            },
            r,
        ),
        Stage(
            f"round-{r}/{SCORE}",
            "score",
            {**_section(config, "score"), "dataset_name": path[GENERATE], "output_dir": path[SCORE]},
            r,
        ),
    ]
    # Round 0 (anchored) sampled for every round's prompts: its rows are those of its own slice.
    train_rows = prompt_rows(config, r) if config.anchored and r == 0 and config.prompts_per_round else None
    if train_rows is not None:
        train_rows = train_rows[: config.prompts_per_round]
    stages.append(
        Stage(
            f"round-{r}/{TRAIN_DATA}",
            "build-offpolicy",
            {
                **_section(config, "build_offpolicy"),
                "dataset_name": path[SCORE],
                # The samples must be the reference's own: checked against generate's record of its model.
                "sampled_by": {"generate_dir": path[GENERATE], "model": policy},
                "prompt_rows": train_rows,
                # Anchored rounds: quantiles among the starting model's round-0 references of the same prompt.
                "anchor": (
                    {
                        "score_dir": str(round_dir(config, 0) / SCORE),
                        "generate_dir": str(round_dir(config, 0) / GENERATE),
                        "model": config.model_name_or_path,
                    }
                    if anchored_round
                    else None
                ),
                "output_dir": path[TRAIN_DATA],
            },
            r,
        )
    )
    train_data = path[TRAIN_DATA]
    if anchored_round:
        train = _section(config, "train")
        stages.append(
            Stage(
                f"round-{r}/{REF_LOGPS}",
                "ref-logps",
                _ref_logps_options(
                    config,
                    reference,
                    train_data,
                    path[REF_LOGPS],
                    max_length=train.get("max_length", _default_max_length("max_length")),
                    truncation_mode=train.get("truncation_mode", _default_max_length("truncation_mode")),
                ),
                r,
            )
        )
        train_data = path[REF_LOGPS]
    train = {
        "seed": config.seed,
        **_section(config, "train"),
        "model_name_or_path": policy,
        "dataset_name": train_data,
    }
    if anchored_round:
        # The start-up check recomputes stored log-probs with the policy, which is the reference only in round 0.
        train["check_ref_logps"] = 0
    train["output_dir"] = path[POLICY]
    stages.append(Stage(f"round-{r}/{POLICY}", "train", train, r))
    if config.eval_dataset_name is not None:
        evaluation = str(folder / EVALUATE)
        stages.append(
            Stage(f"round-{r}/{EVALUATE}", "evaluate", evaluate_options(config, policy_of(config, r), evaluation), r)
        )
        if reference != config.model_name_or_path:  # the KL to the round's own reference as well
            stages.append(
                Stage(
                    f"round-{r}/{EVALUATE_REF_LOGPS}",
                    "ref-logps",
                    _ref_logps_options(
                        config, reference, evaluation, str(folder / EVALUATE_REF_LOGPS), columns=["completion"]
                    ),
                    r,
                )
            )
    return stages


def plan_stages(config: IterateConfig) -> list[Stage]:
    """Every stage of the run, in the order they run: the starting model's evaluation, then round 0, 1, ..."""
    stages = []
    if config.eval_dataset_name is not None and config.evaluate_start:
        output_dir = str(Path(config.output_dir) / START / EVALUATE)
        stages.append(
            Stage(f"{START}/{EVALUATE}", "evaluate", evaluate_options(config, config.model_name_or_path, output_dir))
        )
    for r in range(config.num_rounds):
        stages.extend(round_stages(config, r))
    return stages
