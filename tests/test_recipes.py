"""Every recipe under recipes/ goes through the parsers that `trl qrpo` uses, so none rots.

Training recipes: TRL's TrlParser with the training script's dataclasses (ScriptArguments, QRPOConfig, ModelConfig,
DatasetMixtureConfig), then the keys no dataclass knows through TRL's --accelerate_config resolution and accelerate's
own `accelerate launch` parser and validation. Accelerate configs: accelerate's ClusterConfig loader (which refuses
unknown keys) and the launch validation. The paper recipes are also checked against the authors' hyperparameters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
ACCELERATE_DIR = RECIPES / "accelerate_configs"
TRAINING_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if ACCELERATE_DIR not in p.parents)
PAPER_RECIPES = sorted((RECIPES / "paper").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted(ACCELERATE_DIR.glob("*.yaml"))


def _id(path: Path) -> str:
    return str(path.relative_to(RECIPES))


@pytest.fixture
def in_repo(monkeypatch):
    """Recipes name repository-relative paths (accelerate configs); the parser also writes `env:` to os.environ."""
    monkeypatch.chdir(REPO)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def parse_recipe(path: Path, *extra: str):
    """Parse as `trl qrpo --config path [extra]` does; returns the four dataclasses and accelerate's arguments."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    from trl_qrpo.scripts.qrpo import make_parser

    script_args, training_args, model_args, dataset_args, config_remaining, cli_remaining = make_parser(
        prog="trl qrpo"
    ).parse_args_and_config(
        ["--config", str(path), *extra], return_remaining_strings=True, separate_remaining_strings=True
    )
    assert cli_remaining == []
    launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    try:
        accelerate_args = launch_command_parser().parse_args(launch_args + ["train.py"])
    except SystemExit as exit_:  # argparse reports unknown keys by exiting
        raise AssertionError(
            f"{path}: keys that neither QRPO's dataclasses nor accelerate know: {launch_args}"
        ) from exit_
    accelerate_args, _, _ = _validate_launch_command(accelerate_args)
    accelerate_args.trl_qrpo_launch_args = launch_args
    return script_args, training_args, model_args, dataset_args, accelerate_args


def test_recipes_are_found():
    names = {_id(p) for p in TRAINING_RECIPES}
    assert "quickstart/qrpo.yaml" in names
    assert len(PAPER_RECIPES) == 5, [p.name for p in PAPER_RECIPES]
    assert {p.stem for p in ACCELERATE_CONFIGS} >= {
        "ddp",
        "ddp_multinode",
        "zero2",
        "zero3",
        "zero3_offload",
        "zero3_multinode",
    }


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=_id)
def test_training_recipe_parses(path, in_repo):
    # GPU recipes ask for bf16, which transformers refuses on a CPU-only machine unless use_cpu is set; the flag only
    # changes the device check, not the values checked here.
    extra = ("--use_cpu", "true") if path in PAPER_RECIPES else ()
    script_args, training_args, model_args, dataset_args, _ = parse_recipe(path, *extra)
    assert model_args.model_name_or_path, "a recipe names its model"
    assert script_args.dataset_name or dataset_args.datasets, "a recipe names its data"
    assert training_args.output_dir and training_args.output_dir.startswith("outputs/"), "outputs/ is git-ignored"


# The authors' sweeps (reproducibility-scripts/neurips-2025-{chat,code}/9-train in their repository; qrpo-math.md 4).
CHAT = {"beta": {3e-4, 1e-3, 3e-3}, "num_ref_rewards": {1, 3}}
CODE = {"beta": {3e-3, 1e-2, 3e-2}, "num_ref_rewards": {20}}


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=_id)
def test_paper_recipe_has_the_authors_hyperparameters(path, in_repo):
    _, args, model_args, _, accelerate_args = parse_recipe(path, "--use_cpu", "true")
    sweep = CODE if "leetcode" in path.name else CHAT
    assert args.transform == "identity"
    assert args.loss_type == ["mse"]
    assert args.sample_selector == "both"
    assert args.partition_mode == "continuous"
    assert args.ties == "le"
    assert args.beta in sweep["beta"]
    assert args.beta == sorted(sweep["beta"])[1], "the middle of the sweep"
    assert args.num_ref_rewards in sweep["num_ref_rewards"]
    assert args.learning_rate in {1e-7, 3e-7, 1e-6}
    assert args.lr_scheduler_type == "cosine"
    assert args.warmup_steps == pytest.approx(0.1)
    assert args.num_train_epochs == 1
    assert args.max_length == 2048
    assert args.bf16 and model_args.dtype == "bfloat16"
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerate_args.num_processes
    assert global_batch == 128, "the authors' 128 pairs per optimizer step"
    assert accelerate_args.use_deepspeed and int(accelerate_args.zero_stage) == 3
    text = path.read_text()
    assert f"trl qrpo --config recipes/paper/{path.name}" in text, "the header shows the command for this file"


def test_quickstart_recipe_runs_on_cpu(in_repo):
    path = RECIPES / "quickstart" / "qrpo.yaml"
    _, args, model_args, _, accelerate_args = parse_recipe(path)
    assert args.bf16 is False and args.fp16 is False
    assert accelerate_args.trl_qrpo_launch_args == [], "one process, whatever accelerate's defaults on the machine"
    assert model_args.model_name_or_path == "outputs/quickstart/SmolLM2-135M-Instruct"
    assert f"prepare-smollm2 --output_dir {model_args.model_name_or_path}" in path.read_text()
    prompts = [json.loads(line) for line in (RECIPES / "quickstart" / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) >= 32
    for row in prompts:
        assert list(row) == ["prompt"]
        assert [message["role"] for message in row["prompt"]] == ["user"] and row["prompt"][0]["content"].strip()


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=_id)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # raises on keys accelerate does not know
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    for section in ("deepspeed_config", "fsdp_config"):
        # accelerate copies these onto its arguments without checking them: a typo would be silently ignored
        unknown = set(getattr(config, section) or {}) - known
        assert not unknown, f"{path.name}: {section} keys accelerate does not know: {sorted(unknown)}"
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "train.py"]))
    assert args.mixed_precision == "bf16"
    assert args.num_processes == 8 * args.num_machines
    if "zero" in path.stem:
        assert args.use_deepspeed
        assert int(args.zero_stage) == int(path.stem[4])
        assert (args.offload_param_device == "cpu") == ("offload" in path.stem)
    else:
        assert args.multi_gpu and not args.use_deepspeed
    if "multinode" in path.stem:
        assert args.num_machines > 1
        assert f"--accelerate_config recipes/accelerate_configs/{path.name}" in path.read_text()
