"""`trl qrpo`, `trl-qrpo` and `python -m trl_qrpo`: routing, launch parity with `trl dpo`, data loading, and real runs.

The first part runs in-process (routing, how arguments are split between accelerate and the script, compared with
TRL's own `trl dpo` command, local data). The `slow` part runs the installed commands in subprocesses: it needs the
package installed in the interpreter's environment (`pip install .` or `pip install -e .`), and is skipped otherwise.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import types
from argparse import Namespace
from pathlib import Path

import pytest

from trl_qrpo import cli

PRECOMPUTE_CLI = "trl_qrpo.scripts.precompute_cli"


# --------------------------------------------------------------------------------------------------------- routing


def _fake_precompute_cli(monkeypatch, subcommands):
    module = types.ModuleType(PRECOMPUTE_CLI)
    module.SUBCOMMANDS = subcommands
    module.HELP = {name: f"help of {name}" for name in subcommands}
    monkeypatch.setitem(sys.modules, PRECOMPUTE_CLI, module)


def test_subcommand_gets_its_arguments_and_prog(monkeypatch):
    calls = []

    def generate(argv, prog):
        calls.append((argv, prog))
        return 3

    _fake_precompute_cli(monkeypatch, {"generate": generate})
    assert cli.main(["generate", "--num_samples", "2", "--config", "x.yaml"], prog="trl qrpo") == 3
    assert calls == [(["--num_samples", "2", "--config", "x.yaml"], "trl qrpo generate")]


def test_builtin_subcommand_is_routed(monkeypatch):
    import trl_qrpo.scripts.prepare_smollm2

    calls = []
    monkeypatch.setattr(
        trl_qrpo.scripts.prepare_smollm2, "prepare_smollm2_cli", lambda argv, prog: calls.append((argv, prog)) or 0
    )
    assert cli.main(["prepare-smollm2", "--output_dir", "d"], prog="trl-qrpo") == 0
    assert calls == [(["--output_dir", "d"], "trl-qrpo prepare-smollm2")]


def test_unknown_subcommand_is_an_error_that_lists_the_known_ones(monkeypatch, capsys):
    _fake_precompute_cli(monkeypatch, {"generate": lambda argv, prog: 0, "score": lambda argv, prog: 0})
    assert cli.main(["genrate"], prog="trl qrpo") == 2
    err = capsys.readouterr().err
    assert (
        "'genrate'" in err and "env, generate, iterate, prepare-smollm2, score" in err and "trl qrpo --config" in err
    )


def test_no_arguments_prints_help_instead_of_launching(monkeypatch, capsys):
    monkeypatch.setattr(cli, "train", lambda argv, prog: pytest.fail("launched"))
    assert cli.main([], prog="trl qrpo") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: trl qrpo ") and "  --transform " in out and "trl qrpo prepare-smollm2" in out


PRECOMPUTE_COMMANDS = ["build-offpolicy", "evaluate", "generate", "merge", "ref-logps", "score", "status"]


def test_real_precompute_cli_subcommands_follow_the_contract():
    """Each pre-computation command of trl_qrpo/scripts/precompute_cli.py is routed, has a help line, answers --help."""
    from trl_qrpo.scripts.precompute_cli import HELP, SUBCOMMANDS

    assert sorted(SUBCOMMANDS) == PRECOMPUTE_COMMANDS
    assert sorted(cli.get_subcommands()) == sorted(["env", "prepare-smollm2", "iterate", *PRECOMPUTE_COMMANDS])
    for name, function in SUBCOMMANDS.items():
        assert callable(function) and not name.startswith("-") and HELP.get(name), name
        assert cli.get_subcommands()[name] is function
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"], prog="trl qrpo")
        assert exit_.value.code in (0, None), name


def test_help_lists_every_subcommand_with_its_line():
    from trl_qrpo.scripts.precompute_cli import HELP

    description = cli._description("trl qrpo")
    for name in ["env", "prepare-smollm2", *PRECOMPUTE_COMMANDS]:
        line = next(line for line in description.splitlines() if line.strip().startswith(f"trl qrpo {name} "))
        assert (HELP.get(name) or cli.BUILTIN_HELP[name]) in line, name


@pytest.mark.slow
def test_import_of_the_cli_stays_cheap():
    """The start-up hook imports trl_qrpo.cli whenever TRL's CLI lists its commands: it must not pull in the rest."""
    code = (
        "import sys, trl_qrpo.cli\n"
        "print(sorted(m for m in ('trl_qrpo.scripts.precompute_cli', 'trl_qrpo.trainer', 'trl_qrpo.precompute', "
        "'transformers', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------------- `env`


def test_env_report_is_trls_with_trl_qrpo_after_trls_version(monkeypatch):
    import trl.scripts.env

    trls = "\nCopy-paste the following information when reporting an issue:\n\n- Platform: x\n- TRL version: 9.9\n- PyTorch version: 1\n"
    monkeypatch.setattr(trl.scripts.env, "print_env", lambda: print(trls))
    lines = cli.environment_report().splitlines()
    at = lines.index("- TRL version: 9.9")
    assert lines[at + 1].startswith("- trl-qrpo version: ")
    assert lines[at + 2].startswith("- `trl qrpo` command: ")
    assert lines[: at + 1] + lines[at + 3 :] == (trls + "\n").splitlines(), "TRL's own lines unchanged, in order"


def test_env_report_with_the_real_print_env(capsys):
    assert cli.main(["env"], prog="trl-qrpo") == 0
    out = capsys.readouterr().out
    import trl

    from trl_qrpo import __version__

    assert f"- trl-qrpo version: {__version__}" in out
    assert out.index("- TRL version: " + trl.__version__) < out.index("- trl-qrpo version:") < out.index("- PyTorch")


# ------------------------------------------------------------------------------- launching, compared with trl dpo


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)
    path = tmp_path / "recipe.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            model_name_or_path: some/model
            dataset_name: some/data
            output_dir: out
            bf16: false
            beta: 0.05
            num_processes: 2
            accelerate_config: multi_gpu
            env:
              TRL_QRPO_TEST_VARIABLE: set-by-recipe
            """
        )
    )
    yield path
    os.environ.clear()
    os.environ.update(saved)


def _capture_trl_dpo(monkeypatch, argv):
    """What TRL's own `trl dpo <argv>` hands to accelerate (launch stubbed)."""
    import trl.cli.accelerate_launcher
    from trl.cli.commands.base import CommandContext
    from trl.cli.commands.training import TrainingCommand

    captured = {}

    def fake_launch(script_name, launch_args, training_script_args):
        captured.update(script=script_name, launch_args=launch_args, script_args=training_script_args)

    monkeypatch.setattr(trl.cli.accelerate_launcher, "launch_training_script", fake_launch)
    assert TrainingCommand("dpo").run(Namespace(), CommandContext(argv=["dpo", *argv])) == 0
    return captured


def _capture_trl_qrpo(argv):
    captured = {}

    def fake_launch(launch_args, training_script_args):
        captured.update(launch_args=launch_args, script_args=training_script_args)

    assert cli.train(list(argv), "trl qrpo", launch_fn=fake_launch) == 0
    return captured


def test_arguments_are_split_exactly_as_trl_dpo_splits_them(recipe, monkeypatch):
    import importlib.resources

    argv = ["--config", str(recipe), "--learning_rate", "1e-6", "--mixed_precision", "no", "--beta", "0.01"]
    ours = _capture_trl_qrpo(argv)
    theirs = _capture_trl_dpo(monkeypatch, argv)
    assert theirs["script"] == "dpo.py"
    assert ours["launch_args"] == theirs["launch_args"]
    assert ours["script_args"] == theirs["script_args"]
    multi_gpu = importlib.resources.files("trl.accelerate_configs").joinpath("multi_gpu.yaml")
    # YAML keys no dataclass knows, then unknown flags, go to accelerate; --accelerate_config becomes --config_file
    assert ours["launch_args"] == ["--config_file", str(multi_gpu), "--num_processes", "2", "--mixed_precision", "no"]
    assert ours["script_args"] == ["--config", str(recipe), "--learning_rate", "1e-6", "--beta", "0.01"]
    assert os.environ["TRL_QRPO_TEST_VARIABLE"] == "set-by-recipe"  # `env:` applies, inherited by the launch


def test_qrpo_options_go_to_the_script_not_to_accelerate(recipe):
    argv = ["--config", str(recipe), "--transform", "log", "--num_ref_rewards", "3", "--use_peft", "--lora_r", "8"]
    captured = _capture_trl_qrpo(argv)
    assert captured["script_args"] == argv
    assert "--transform" not in captured["launch_args"]


def test_invalid_qrpo_option_fails_before_launching(recipe):
    with pytest.raises(ValueError, match="ties"):
        _capture_trl_qrpo(["--config", str(recipe), "--ties", "sometimes"])


def test_launch_uses_accelerate_launch_on_the_packaged_script():
    captured = []
    cli.launch_training_script(
        ["--num_processes", "1", "--mixed_precision", "no"], ["--config", "r.yaml"], launch_command_fn=captured.append
    )
    (args,) = captured
    script = Path(args.training_script)
    assert script.is_file() and script.parts[-3:] == ("trl_qrpo", "scripts", "qrpo.py")
    assert args.training_script_args == ["--config", "r.yaml"]
    assert args.num_processes == 1 and args.mixed_precision == "no"


@pytest.fixture
def no_accelerate_default_config(monkeypatch, tmp_path):
    """As on a fresh machine: no `accelerate config` file."""
    import accelerate.commands.config
    import accelerate.commands.launch

    missing = str(tmp_path / "no-default-config.yaml")
    monkeypatch.setattr(accelerate.commands.config, "default_config_file", missing)
    monkeypatch.setattr(accelerate.commands.launch, "default_config_file", missing)


def _validate_and_capture_warnings(args, caplog):
    import logging

    from accelerate.commands.launch import _validate_launch_command

    with caplog.at_level(logging.WARNING):
        _validate_launch_command(args)
    return caplog.text


def test_launch_sets_accelerates_defaults_so_it_does_not_warn(no_accelerate_default_config, caplog):
    """accelerate's "The following values were not passed to `accelerate launch`" list does not appear."""
    import torch
    from accelerate.commands.launch import launch_command_parser

    captured = []
    cli.launch_training_script([], ["--config", "r.yaml"], launch_command_fn=captured.append)
    (args,) = captured
    assert args.num_processes == max(torch.cuda.device_count(), 1)
    assert (args.num_machines, args.mixed_precision, args.dynamo_backend) == (1, "no", "no")
    assert "were not passed to `accelerate launch`" not in _validate_and_capture_warnings(args, caplog)
    # What accelerate says without them (the check above can fail):
    bare = launch_command_parser().parse_args([args.training_script])
    assert "`--num_processes` was set to a value of" in _validate_and_capture_warnings(bare, caplog)


def test_launch_defaults_leave_given_values_and_config_files_alone(no_accelerate_default_config, tmp_path):
    captured = []
    cli.launch_training_script(
        ["--num_processes", "2", "--mixed_precision", "bf16"], [], launch_command_fn=captured.append
    )
    assert (captured[0].num_processes, captured[0].mixed_precision) == (2, "bf16")
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n")
    cli.launch_training_script(["--config_file", str(config)], [], launch_command_fn=captured.append)
    assert captured[1].num_processes is None and captured[1].mixed_precision is None, "the config file's to give"


def test_failed_training_returns_its_exit_status(recipe, capsys):
    def failing_launch(launch_args, script_args):
        raise subprocess.CalledProcessError(returncode=7, cmd=["python", "qrpo.py"])

    assert cli.train(["--config", str(recipe)], "trl qrpo", launch_fn=failing_launch) == 7
    assert "exited with status 7" in capsys.readouterr().err


def test_trl_main_routes_qrpo_through_trls_own_parser(monkeypatch):
    """`trl qrpo ...` as TRL's main() parses it, with the command list the start-up hook produces."""
    import trl.cli.commands

    from trl_qrpo._trl_hook import wrap_get_commands

    trl_main_module = sys.modules["trl.cli.main"]
    original = getattr(trl.cli.commands.get_commands, "__wrapped__", trl.cli.commands.get_commands)
    monkeypatch.setattr(trl_main_module, "get_commands", wrap_get_commands(original))
    calls = []
    monkeypatch.setattr(cli, "train", lambda argv, prog: calls.append((argv, prog)) or 0)
    assert trl_main_module.main(["qrpo", "--config", "r.yaml", "--help"]) == 0
    assert calls == [(["--config", "r.yaml", "--help"], "trl qrpo")]


# ------------------------------------------------------------------------------------------------------ local data


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("data")
    rows = Dataset.from_dict(
        {
            "prompt": ["a", "b", "c", "d"],
            "completion": ["w", "x", "y", "z"],
            "reward": [0.1, 0.2, 0.3, 0.4],
            "ref_rewards": [[0.0, 0.5]] * 4,
        }
    )
    DatasetDict({"train_prefs": rows, "test_prefs": rows.select(range(2))}).save_to_disk(str(root / "dict"))
    rows.save_to_disk(str(root / "single"))
    rows.to_json(str(root / "rows.jsonl"))
    rows.to_parquet(str(root / "rows.parquet"))
    return root


@pytest.mark.parametrize(
    "name, splits",
    [
        ("dict", {"train_prefs": 4, "test_prefs": 2}),
        ("single", {"my_train": 4}),
        ("rows.jsonl", {"my_train": 4}),
        ("rows.parquet", {"my_train": 4}),
    ],
)
def test_dataset_name_reads_local_data(local_data, name, splits):
    from trl_qrpo.scripts.qrpo import load_dataset_by_name

    dataset = load_dataset_by_name(str(local_data / name), train_split="my_train")
    assert {split: len(rows) for split, rows in dataset.items()} == splits
    first = next(iter(dataset.values()))
    assert first[0]["ref_rewards"] == [0.0, 0.5] and first.features["reward"].dtype == "float64"


def test_missing_local_file_is_a_clear_error(tmp_path):
    from trl_qrpo.scripts.qrpo import load_dataset_by_name

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_by_name(str(tmp_path / "scored.jsonl"))


def test_dataset_mixture_reads_local_data_with_trls_get_dataset(local_data):
    from trl import DatasetMixtureConfig, get_dataset
    from trl.scripts.utils import DatasetConfig

    from trl_qrpo.scripts.qrpo import localize_mixture

    mixture = DatasetMixtureConfig(
        datasets=[
            DatasetConfig(path=str(local_data / "single"), columns=["prompt", "reward"]),
            DatasetConfig(path=str(local_data / "dict"), split="test_prefs", columns=["prompt", "reward"]),
            DatasetConfig(path=str(local_data / "rows.jsonl"), columns=["prompt", "reward"]),
        ],
        test_split_size=0.25,
    )
    dataset = get_dataset(localize_mixture(mixture))
    assert {split: len(rows) for split, rows in dataset.items()} == {"train": 7, "test": 3}
    assert sorted(dataset["train"].column_names) == ["prompt", "reward"]


def test_missing_split_names_the_available_ones():
    from datasets import Dataset, DatasetDict

    from trl_qrpo.scripts.qrpo import _get_split

    data = DatasetDict({"train": Dataset.from_dict({"a": [1]})})
    with pytest.raises(ValueError, match="'test'.*it has: train.*--eval_strategy no"):
        _get_split(data, "test", "dataset_test_split")


# --------------------------------------------------------------------------------- installed commands (subprocess)

BIN = Path(sys.executable).parent


def _installed() -> bool:
    try:
        importlib.metadata.distribution("trl-qrpo")
    except importlib.metadata.PackageNotFoundError:
        return False
    return (BIN / "trl").exists() and (BIN / "trl-qrpo").exists()


installed = pytest.mark.skipif(not _installed(), reason="trl-qrpo is not installed here (pip install -e . or .)")


def run(command, cwd=None, env=None, timeout=300):
    return subprocess.run(
        command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@installed
@pytest.mark.parametrize(
    "command, prog",
    [
        ([str(BIN / "trl"), "qrpo"], "trl qrpo"),
        ([str(BIN / "trl-qrpo")], "trl-qrpo"),
        ([sys.executable, "-m", "trl_qrpo"], "python -m trl_qrpo"),
    ],
    ids=["trl qrpo", "trl-qrpo", "python -m trl_qrpo"],
)
def test_help_lists_qrpo_options(command, prog, tmp_path):
    result = run([*command, "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {prog} ")
    for option in ("--transform", "--num_ref_rewards", "--sample_selector", "--beta", "--dataset_name", "--use_peft"):
        assert f"  {option} " in result.stdout, option
    assert f"{prog} prepare-smollm2" in result.stdout  # subcommands are listed


@pytest.mark.slow
@installed
def test_trl_lists_qrpo_next_to_its_own_commands_and_the_hook_can_be_switched_off(tmp_path):
    from trl.cli.commands import get_commands

    trl_commands = [c.name for c in getattr(get_commands, "__wrapped__", get_commands)()]
    assert "qrpo" not in trl_commands
    result = run([str(BIN / "trl"), "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "{" + ",".join(trl_commands + ["qrpo"]) + "}" in result.stdout
    disabled = run([str(BIN / "trl"), "--help"], cwd=tmp_path, env={"TRL_QRPO_DISABLE_TRL_HOOK": "1"})
    assert disabled.returncode == 0 and "{" + ",".join(trl_commands) + "}" in disabled.stdout


@pytest.mark.slow
@installed
def test_trl_dpo_is_unchanged_and_trl_env_reports_trl_qrpo(tmp_path):
    from trl_qrpo import __version__

    dpo = run([str(BIN / "trl"), "dpo", "--help"], cwd=tmp_path)
    assert dpo.returncode == 0, dpo.stderr
    assert dpo.stdout.startswith("usage: trl dpo ") and "  --beta " in dpo.stdout
    assert "--transform" not in dpo.stdout and "--num_ref_rewards" not in dpo.stdout
    for command in ([str(BIN / "trl"), "env"], [str(BIN / "trl-qrpo"), "env"]):
        env = run(command, cwd=tmp_path)
        assert env.returncode == 0, env.stderr
        assert "- TRL version: " in env.stdout and "- Transformers version: " in env.stdout, "TRL's report"
        assert f"- trl-qrpo version: {__version__}" in env.stdout, command
        assert "- `trl qrpo` command: available" in env.stdout, command
    disabled = run([str(BIN / "trl"), "env"], cwd=tmp_path, env={"TRL_QRPO_DISABLE_TRL_HOOK": "1"})
    assert disabled.returncode == 0 and "- TRL version: " in disabled.stdout
    assert "trl-qrpo" not in disabled.stdout, "with the hook off, `trl env` is TRL's own"


@pytest.fixture
def tiny_run(tmp_path, tiny_model_dir):
    """A tiny pointwise data set saved with save_to_disk, and a recipe of 2 CPU steps on the tiny model."""
    from datasets import Dataset, DatasetDict

    prompts = [[{"role": "user", "content": "Write a happy line."}], [{"role": "user", "content": "Tell me a story."}]]
    completions = ["I love this day", "This is bad", "Great and good", "awful"]
    rows = Dataset.from_dict(
        {
            "prompt": [prompts[i % 2] for i in range(8)],
            "completion": [[{"role": "assistant", "content": completions[i % 4]}] for i in range(8)],
            "reward": [0.9, -0.5, 0.8, -0.9, 0.7, -0.2, 0.1, 0.4],
            "ref_rewards": [[0.1, 0.5, -0.2]] * 8,
        }
    )
    DatasetDict({"train": rows, "test": rows.select(range(4))}).save_to_disk(str(tmp_path / "data"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            model_name_or_path: {tiny_model_dir}
            dataset_name: {tmp_path / "data"}
            output_dir: {tmp_path / "out"}
            max_steps: 2
            per_device_train_batch_size: 4
            per_device_eval_batch_size: 4
            max_length: 64
            learning_rate: 1.0e-3
            beta: 0.1
            bf16: false
            activation_checkpointing: false
            eval_strategy: steps
            eval_steps: 2
            save_strategy: "no"
            logging_steps: 1
            report_to: none
            num_processes: 1
            """
        )
    )
    return recipe


@pytest.mark.slow
@installed
def test_trl_qrpo_trains_a_tiny_model(tiny_run, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    result = run([str(BIN / "trl"), "qrpo", "--config", str(tiny_run), "--transform", "identity"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Training completed" in result.stdout
    # The screen stays quiet: no list of accelerate defaults, no deprecation warning from the recipe's options.
    assert "were not passed to `accelerate launch`" not in result.stderr
    assert "`gradient_checkpointing` is deprecated" not in result.stderr, result.stderr[-3000:]
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not before[name].equal(after[name]) for name in before), "two optimizer steps changed no weight"
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()


@pytest.mark.slow
@installed
def test_a_failing_run_exits_non_zero_with_the_reason(tiny_run, tmp_path):
    result = run([str(BIN / "trl-qrpo"), "--config", str(tiny_run), "--dataset_name", "missing.jsonl"], cwd=tmp_path)
    assert result.returncode != 0
    assert "missing.jsonl" in result.stderr and "does not exist" in result.stderr
    assert "trl-qrpo: training exited with status" in result.stderr


@pytest.mark.slow
@installed
def test_bad_training_data_is_one_line_that_names_column_and_row(tiny_run, tmp_path):
    rows = [
        {"prompt": "The sky is", "completion": " blue.", "reward": 0.5, "ref_rewards": [0.1, 0.9]},
        {"prompt": "Grass is", "completion": " green.", "reward": None, "ref_rewards": [0.2, 0.4]},
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    command = [str(BIN / "trl-qrpo"), "--config", str(tiny_run), "--dataset_name", str(data), "--eval_strategy", "no"]
    result = run(command, cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "'reward'" in errors[0] and "row 1" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
