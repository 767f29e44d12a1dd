"""The training script's own options and a first run's screen: `--cast_rewards_to_float`, 0-based row numbers in
data errors, QRPO's options first in `trl qrpo --help`, and the config defaults that keep a CPU run free of warnings.

Data errors are raised before any model loads: the tests that go through the script's `main` give a model path
that does not exist, so that a model load would fail with another error than the one asserted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, List, Value

from trl_qrpo.scripts import qrpo as script
from trl_qrpo.scripts.qrpo import cast_rewards_to_float, make_parser

BIN = Path(sys.executable).parent
MISSING_MODEL = "/nonexistent/trl-qrpo-test-model"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(rewards, ref_rewards=None):
    ref_rewards = ref_rewards or [["0.1", "0.5", "0.9"]] * len(rewards)
    return [
        {"prompt": f"Prompt {i}.", "completion": f" Answer {i}.", "reward": reward, "ref_rewards": refs}
        for i, (reward, refs) in enumerate(zip(rewards, ref_rewards, strict=True))
    ]


def _run_main(tmp_path: Path, data: Path, *flags: str):
    """The script's `main` as `trl qrpo` runs it in the launched process, on a model that does not exist."""
    parser = make_parser()
    argv = ["--model_name_or_path", MISSING_MODEL, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]
    argv += ["--report_to", "none", "--save_strategy", "no", *flags]
    script.main(*parser.parse_args_and_config(argv))


# ------------------------------------------------------------------------------------------ --cast_rewards_to_float


def test_cast_rewards_to_float_is_an_option_off_by_default():
    parsed = make_parser().parse_args_and_config(["--output_dir", "o"])
    assert parsed[0].cast_rewards_to_float is False
    parsed = make_parser().parse_args_and_config(["--output_dir", "o", "--cast_rewards_to_float"])
    assert parsed[0].cast_rewards_to_float is True
    assert "cast_rewards_to_float (`bool`, *optional*, defaults to `False`)" in script.ScriptArguments.__doc__


def test_cast_rewards_to_float_casts_every_reward_column_and_keeps_the_rest():
    data = DatasetDict(
        train=Dataset.from_dict(
            {
                "prompt": ["a", "b", "c"],
                "chosen": ["x", "y", "z"],
                "score_chosen": ["1", "0.25", None],  # an alias of chosen_reward
                "rejected_reward": [-1, 0, 2],  # integers: cast too
                "ref_rewards": [["0.5", "-1e-3"], ["3"], ["nan"]],
                "note": ["1", "2", "3"],  # text that is not a reward: untouched
            }
        ),
        test=Dataset.from_dict({"prompt": ["d"], "reward": ["0.75"], "ref_rewards": [["0.1", "0.2"]]}),
    )
    cast = cast_rewards_to_float(data)
    train, test = cast["train"], cast["test"]
    assert train.features["score_chosen"] == Value("float64") and train["score_chosen"] == [1.0, 0.25, None]
    assert train.features["rejected_reward"] == Value("float64") and train["rejected_reward"] == [-1.0, 0.0, 2.0]
    assert train.features["ref_rewards"] == List(Value("float64"))
    assert (
        train["ref_rewards"][:2] == [[0.5, -1e-3], [3.0]] and train["ref_rewards"][2][0] != train["ref_rewards"][2][0]
    )
    assert train.features["note"] == Value("string") and train["note"] == ["1", "2", "3"]
    assert test["reward"] == [0.75] and test["ref_rewards"] == [[0.1, 0.2]], "every split"
    # A lone Dataset works too.
    assert cast_rewards_to_float(Dataset.from_dict({"reward": ["2"]}))["reward"] == [2.0]


@pytest.mark.parametrize(
    ("column", "rows", "row", "value"),
    [
        ("reward", {"reward": ["0.5", "1", "high"]}, 2, "high"),
        ("ref_rewards", {"ref_rewards": [["1"], ["2", "n/a"], ["3"]]}, 1, "n/a"),
    ],
)
def test_cast_rewards_to_float_names_the_value_that_is_not_a_number(column, rows, row, value):
    with pytest.raises(ValueError) as excinfo:
        cast_rewards_to_float(DatasetDict(train=Dataset.from_dict(rows)))
    text = str(excinfo.value)
    assert text.startswith(f"Column '{column}' of split 'train', row {row} (0-based): ")
    assert f"cannot read {value!r} as a number" in text and "fix or drop this row" in text
    assert "\n" not in text


def test_cast_rewards_to_float_refuses_a_column_that_is_not_numbers_or_text():
    data = Dataset.from_dict({"reward": [{"a": 1.0}]})
    with pytest.raises(ValueError, match=r"Column 'reward' holds .*only numbers, text or lists of them"):
        cast_rewards_to_float(data)


def test_cast_rewards_to_float_on_a_streamed_data_set():
    from datasets import IterableDataset

    known = Dataset.from_dict({"reward": ["1", "2"]}).to_iterable_dataset()
    assert [row["reward"] for row in cast_rewards_to_float(known)] == [1.0, 2.0]
    unknown = IterableDataset.from_generator(lambda: iter([{"reward": "1"}]))
    assert unknown.features is None
    with pytest.raises(
        ValueError, match=r"the columns are not known before the data is read .* without --dataset_streaming"
    ):
        cast_rewards_to_float(unknown)


def test_text_rewards_train_with_the_flag_and_fail_before_the_model_without_it(tmp_path):
    data = _write_jsonl(tmp_path / "rows.jsonl", _rows(["0.2", "0.7", "high"]))
    # With the flag: the bad value is named (column, 0-based row: line 3 of the file is row 2), before any model load.
    with pytest.raises(ValueError) as excinfo:
        _run_main(tmp_path, data, "--cast_rewards_to_float")
    assert str(excinfo.value).startswith("Column 'reward' of split 'train', row 2 (0-based): --cast_rewards_to_float")
    assert "'high'" in str(excinfo.value)
    # Without it: text rewards are refused (not converted), also before the model.
    data = _write_jsonl(tmp_path / "ok.jsonl", _rows(["0.2", "0.7", "0.4"]))
    with pytest.raises(ValueError, match=r"Column 'reward' holds its rewards as text"):
        _run_main(tmp_path, data)


def test_a_missing_reward_names_its_row_as_0_based(tmp_path):
    """A null on line 3 of a .jsonl file is row 2: the message says 0-based."""
    rows = _rows([0.2, 0.7, None, 0.1], [[0.1, 0.5, 0.9]] * 4)
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ValueError) as excinfo:
        _run_main(tmp_path, data)
    assert "Column 'reward', row 2 (0-based): the reward is missing" in str(excinfo.value)


def test_rows_message_says_0_based():
    from trl_qrpo.data import _rows_message

    assert _rows_message([2]) == "row 2 (0-based)"
    assert _rows_message([1, 4]) == "rows 1, 4 (0-based)"
    assert _rows_message(range(8)) == "rows 0, 1, 2, 3, 4 (0-based; and 3 more)"


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "trl").exists(), reason="the `trl` command is not installed next to this Python")
def test_cast_error_on_the_command_line_is_one_line(tmp_path):
    data = _write_jsonl(tmp_path / "rows.jsonl", _rows(["0.2", "0.7", "high"]))
    command = [str(BIN / "trl"), "qrpo", "--model_name_or_path", MISSING_MODEL, "--dataset_name", str(data)]
    command += ["--output_dir", str(tmp_path / "out"), "--cast_rewards_to_float", "--report_to", "none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TRL_QRPO_TRACEBACK", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("trl qrpo: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Column 'reward' of split 'train', row 2 (0-based)" in errors[0] and "'high'" in errors[0]
    assert "Traceback" not in result.stderr


# -------------------------------------------------------------------------------------------------- trl qrpo --help


def test_help_lists_qrpo_options_first_with_defaults(capsys):
    from trl import DPOConfig

    from trl_qrpo import QRPOConfig
    from trl_qrpo.cli import QRPO_OPTIONS_HELP, main

    added = {f.name for f in dataclasses.fields(QRPOConfig)} - {f.name for f in dataclasses.fields(DPOConfig)}
    own = added | {"beta", "loss_type", "cast_rewards_to_float"}  # DPO's two with QRPO's meaning and defaults
    assert set(QRPO_OPTIONS_HELP) == own, "every option of QRPO's own is listed, and nothing else"

    assert main([], prog="trl qrpo") == 0
    out = capsys.readouterr().out
    head = out.splitlines()[:25]
    assert head[0] == "usage: trl qrpo [--config recipe.yaml] [options below] [accelerate launch options]"
    assert any(line.startswith("  --beta 0.001 ") and "1/beta nats" in line for line in head), head
    assert any(line.startswith("  --transform identity ") for line in head), head
    assert any(line.startswith("  --cast_rewards_to_float False ") for line in head), head
    assert out.index("QRPO's own options") < out.index("options:\n"), "the short list before the full one"


# ----------------------------------------------------------------------------------------- a quiet run on a CPU


def test_config_defaults_raise_no_deprecation_warning_and_keep_trls_checkpointing():
    from trl_qrpo import QRPOConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = QRPOConfig(output_dir="o")
    assert [str(w.message) for w in caught if "gradient_checkpointing" in str(w.message)] == []
    assert config.activation_checkpointing is True and config.gradient_checkpointing is True, "TRL's default"
    assert QRPOConfig(output_dir="o", activation_checkpointing=False).gradient_checkpointing is False
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the old name still works, and says so
        assert QRPOConfig(output_dir="o", gradient_checkpointing=False).activation_checkpointing is False


def test_pinned_memory_only_with_an_accelerator():
    import torch

    from trl_qrpo import QRPOConfig

    accelerator = torch.accelerator.is_available()
    assert QRPOConfig(output_dir="o").dataloader_pin_memory is accelerator
    assert QRPOConfig(output_dir="o", use_cpu=True).dataloader_pin_memory is False
    assert QRPOConfig(output_dir="o", dataloader_pin_memory=False).dataloader_pin_memory is False


def test_training_script_names_the_cpu_for_deepspeed(monkeypatch):
    import importlib.util

    import torch

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    script._quiet_deepspeed_on_cpu()
    quiet = importlib.util.find_spec("deepspeed") is not None and not torch.accelerator.is_available()
    assert os.environ.get("DS_ACCELERATOR") == ("cpu" if quiet else None)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    script._quiet_deepspeed_on_cpu()
    assert os.environ["DS_ACCELERATOR"] == "cuda", "a value already set is kept"
