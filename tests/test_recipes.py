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
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
ACCELERATE_DIR = RECIPES / "accelerate_configs"
# Configs of the pre-computation subcommands (`trl qrpo generate --config ...`) are named after their subcommand.
SUBCOMMAND_CONFIGS = {"generate.yaml", "score.yaml", "build-offpolicy.yaml", "merge.yaml", "evaluate.yaml"}
PRECOMPUTE_CONFIGS = sorted(p for p in RECIPES.rglob("*.yaml") if p.name in SUBCOMMAND_CONFIGS)
# Configs of `trl qrpo iterate --config ...`: IterateConfig's fields and one section per stage.
ITERATE_CONFIGS = sorted(RECIPES.rglob("iterate.yaml"))
TRAINING_RECIPES = sorted(
    p
    for p in RECIPES.rglob("*.yaml")
    if ACCELERATE_DIR not in p.parents and p.name not in SUBCOMMAND_CONFIGS and p not in ITERATE_CONFIGS
)
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


# The authors' sweeps (from their published training scripts; docs/math.md, "The authors' hyperparameters").
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
    held_out = [json.loads(line) for line in (RECIPES / "quickstart" / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(prompts) >= 32
    for row in prompts + held_out:
        assert list(row) == ["prompt"]
        assert [message["role"] for message in row["prompt"]] == ["user"] and row["prompt"][0]["content"].strip()


@pytest.mark.parametrize("path", PRECOMPUTE_CONFIGS, ids=_id)
def test_precompute_config_parses(path, in_repo):
    """Parsed by the subcommand's own parser, which refuses keys it does not know."""
    from trl import TrlParser

    from trl_qrpo.scripts import precompute_cli

    parsed = TrlParser(precompute_cli.COMMAND_CONFIGS[path.stem]).parse_args_and_config(args=["--config", str(path)])
    args = SimpleNamespace(**{k: v for group in parsed for k, v in vars(group).items()})
    command = f"trl qrpo {path.stem} --config {path.relative_to(REPO)}"
    assert command in path.read_text(), "the header shows the command"
    if getattr(args, "dataset_name", None) and not args.dataset_name.startswith("outputs/"):
        assert (REPO / args.dataset_name).is_file(), "input data in the repository"
    if getattr(args, "output_dir", None):
        assert args.output_dir.startswith("outputs/"), "outputs/ is git-ignored"


@pytest.mark.parametrize("path", ITERATE_CONFIGS, ids=_id)
def test_iterate_config_parses_with_every_stage(path, in_repo, tmp_path):
    """`trl qrpo iterate`'s parser, then every stage's options through its own command's parser (the training
    section as a `trl qrpo --config` recipe, accelerate's keys included), as the run writes them."""
    from trl import TrlParser

    from trl_qrpo.iterative import IterateConfig, plan_stages
    from trl_qrpo.precompute import BuildOffPolicyConfig
    from trl_qrpo.scripts import precompute_cli

    (config,) = TrlParser((IterateConfig,)).parse_args_and_config(args=["--config", str(path)])
    assert f"trl qrpo iterate --config {path.relative_to(REPO)}" in path.read_text(), "the header shows the command"
    assert config.output_dir.startswith("outputs/"), "outputs/ is git-ignored"
    for name in ("dataset_name", "eval_dataset_name"):
        assert (REPO / getattr(config, name)).is_file(), "prompts in the repository"
    stages = plan_stages(config)
    assert {s.command for s in stages} >= {"generate", "score", "build-offpolicy", "train", "evaluate"}
    for stage in stages:
        stage_file = tmp_path / f"{stage.name.replace('/', '-')}.yaml"
        stage_file.write_text(yaml.safe_dump(stage.options))
        if stage.command == "train":
            parse_recipe(stage_file)
        elif stage.command == "build-offpolicy":  # the run's own step (in its process): the section is the config's
            BuildOffPolicyConfig(**config.build_offpolicy)
        elif stage.command in precompute_cli.COMMAND_CONFIGS:
            TrlParser(precompute_cli.COMMAND_CONFIGS[stage.command]).parse_args_and_config(
                args=["--config", str(stage_file)]
            )


def test_quickstart_pipeline_is_wired(in_repo):
    """Each step of the quick start reads what the step before it writes (the YAML defaults, as run by hand)."""
    import yaml

    quickstart = RECIPES / "quickstart"
    config = {name: yaml.safe_load((quickstart / f"{name}.yaml").read_text()) for name in ("generate", "score")}
    config["build"] = yaml.safe_load((quickstart / "build-offpolicy.yaml").read_text())
    config["train"] = yaml.safe_load((quickstart / "qrpo.yaml").read_text())
    assert config["generate"]["dataset_name"] == "recipes/quickstart/prompts.jsonl"
    assert config["score"]["dataset_name"] == config["generate"]["output_dir"]
    assert config["build"]["dataset_name"] == config["score"]["output_dir"]
    assert config["train"]["dataset_name"] == config["build"]["output_dir"]
    assert config["train"]["model_name_or_path"] == config["generate"]["model_name_or_path"]
    evaluate = yaml.safe_load((quickstart / "evaluate.yaml").read_text())
    assert evaluate["dataset_name"] == "recipes/quickstart/eval_prompts.jsonl"
    assert evaluate["reward_funcs"] == config["score"]["reward_funcs"] == ["trl_qrpo.rewards.vader_sentiment"]
    assert evaluate["max_new_tokens"] == config["generate"]["max_new_tokens"]
    train_prompts = (quickstart / "prompts.jsonl").read_text().splitlines()
    held_out = (quickstart / "eval_prompts.jsonl").read_text().splitlines()
    assert len(held_out) >= 16 and not set(train_prompts) & set(held_out), "evaluation prompts are held out"


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


# ------------------------------------------------------------- paper recipes: the data the pre-computation writes


def _header_commands(path: Path) -> str:
    """The shell lines of a recipe's header (comment markers removed, continuation lines joined)."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return " ".join(" ".join(lines).replace("\\", " ").split())


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=_id)
def test_paper_recipe_reads_the_splits_its_precomputation_writes(path, in_repo):
    script_args, args, _, _, _ = parse_recipe(path, "--use_cpu", "true")
    header = _header_commands(path)
    run_dir = f"outputs/{path.stem}"
    assert f"R={run_dir} " in header
    assert script_args.dataset_name == f"{run_dir}/ref-rewards"
    # One split per pass, each exported next to the other: <dataset_name>/{train,test}.parquet.
    assert "for split in train test; do" in header
    assert "--output_file $R/ref-rewards/$split.parquet" in header
    assert (script_args.dataset_train_split, script_args.dataset_test_split) == ("train", "test")
    assert args.eval_strategy == "steps", "the test split is used"
    assert "--num_generations 50" in header and "--max_new_tokens 2048" in header
    if "leetcode" in path.name:
        assert "build-offpolicy --dataset_name $R/scored-$split --mode random_pairs --num_candidates 10" in header
    else:
        assert "--reward_model_name_or_path RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust_remote_code" in header
    if "ultrafeedback" in path.name:
        # H4's data: a string `prompt` next to conversational pairs, and GPT-4 ratings under reward aliases.
        assert "remove_columns(['prompt', 'messages', 'score_chosen', 'score_rejected'])" in header


def _paired_source(n: int, with_ratings: bool = False):
    from datasets import Dataset

    data = {
        "chosen": [
            [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"good {i}"}]
            for i in range(n)
        ],
        "rejected": [
            [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "bad"}] for i in range(n)
        ],
    }
    if with_ratings:
        data["score_chosen"], data["score_rejected"] = [8.0] * n, [3.0] * n
    return Dataset.from_dict(data)


def test_precomputation_as_the_paper_recipes_run_it_feeds_their_data_settings(tmp_path, tiny_model_dir, in_repo):
    """generate + score (+ build-offpolicy) per split with --output_file, then the training script's loader."""
    from trl_qrpo.data import alias_renames, detect_layout, shadowed_aliases
    from trl_qrpo.scripts.precompute_cli import SUBCOMMANDS
    from trl_qrpo.scripts.qrpo import load_dataset_by_name

    tiny = ["--model_name_or_path", str(tiny_model_dir), "--num_generations", "3", "--max_new_tokens", "4"]
    tiny += ["--backend", "transformers", "--batch_size", "8"]
    sys_path_reward = "test_recipes.length_reward"
    for run, offpolicy in (("chat", False), ("code", True)):
        R = tmp_path / run
        for split, n in (("train", 4), ("test", 2)):
            _paired_source(n).to_parquet(str(R / f"pairs-{split}.parquet"))
            assert (
                SUBCOMMANDS["generate"](
                    [
                        "--dataset_name",
                        str(R / f"pairs-{split}.parquet"),
                        *tiny,
                        "--output_dir",
                        str(R / f"refs-{split}"),
                    ],
                    "trl qrpo generate",
                )
                == 0
            )
            export = ["--output_file", str(R / "ref-rewards" / f"{split}.parquet")]
            score = ["--dataset_name", str(R / f"refs-{split}"), "--reward_funcs", sys_path_reward]
            assert (
                SUBCOMMANDS["score"](
                    [*score, "--output_dir", str(R / f"scored-{split}"), *([] if offpolicy else export)],
                    "trl qrpo score",
                )
                == 0
            )
            if offpolicy:
                assert (
                    SUBCOMMANDS["build-offpolicy"](
                        [
                            "--dataset_name",
                            str(R / f"scored-{split}"),
                            "--mode",
                            "random_pairs",
                            "--num_candidates",
                            "3",
                        ]
                        + ["--output_dir", str(R / f"pairs-out-{split}"), *export],
                        "trl qrpo build-offpolicy",
                    )
                    == 0
                )
        data = load_dataset_by_name(str(R / "ref-rewards"), train_split="train")
        assert set(data) == {"train", "test"} and (len(data["train"]), len(data["test"])) == (4, 2)
        columns = data["train"].column_names
        assert alias_renames(columns) == {}
        layout = detect_layout(columns)
        assert layout.kind == "paired" and layout.has_ref_rewards and layout.has_in_refs == offpolicy

    # H4's ratings next to the new rewards: the new (canonical) columns are used, the ratings are reported as unused.
    columns = [*_paired_source(1, with_ratings=True).column_names, "chosen_reward", "rejected_reward"]
    assert alias_renames(columns) == {}
    assert shadowed_aliases(columns) == {"score_chosen": "chosen_reward", "score_rejected": "rejected_reward"}


def length_reward(prompts, completions, **kwargs):
    """A reward function with TRL's signature, importable as `test_recipes.length_reward` (tests/ is on sys.path)."""
    return [float(len(c[-1]["content"] if isinstance(c, list) else c)) for c in completions]
