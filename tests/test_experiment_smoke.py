"""Smoke test of experiments/run.py: the whole pipeline (references, scores, pairs, pi_ref evaluation, QRPO / DPO /
SimPO / REBEL training and evaluation, a QRPO sweep run, tables and plots) with the tiny offline model, then a
second invocation that must find everything done (resume)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "experiments" / "run.py"

REWARD_MODULE = '''
def letter_e(prompts, completions, **kwargs):
    """A deterministic pointwise reward that varies on the tiny model's gibberish: the share of the letter e."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [t.count("e") / max(len(t), 1) for t in texts]
'''


def _load_run_module():
    spec = importlib.util.spec_from_file_location("experiment_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_experiment_pipeline_quick(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "smoke_reward_e.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _load_run_module()
    work, results = tmp_path / "work", tmp_path / "results"
    argv = [
        "--quick",
        "--model",
        str(tiny_model_dir),
        "--work_dir",
        str(work),
        "--results_dir",
        str(results),
        "--set",
        "reward=smoke_reward_e:letter_e",
        "--set",
        "sweep.transforms={log: [0.1]}",
        "--set",
        "sweep.num_ref_rewards=[1]",
    ]
    assert run.main(argv) == 0

    summary = json.loads((results / "results.json").read_text())
    assert {row["method"] for row in summary["methods"]} == {"qrpo", "dpo", "simpo", "rebel"}
    assert summary["reference"]["num_seeds"] == 1
    for row in summary["methods"]:
        assert row["num_seeds"] == 1 and row["samples_per_seed"] == 8  # 4 eval prompts x 2 samples
        assert row["reward"] is not None and row["kl"] is not None and row["length"] > 0
    assert [r["transform"] for r in summary["qrpo_transforms"]] == ["identity", "log"]
    assert [r["num_ref_rewards"] for r in summary["qrpo_num_ref_rewards"]] == [1, 10]
    stats = summary["data"]
    assert stats["references_per_prompt"] == 14 and stats["num_pairs"] >= 1
    for name in ("reward_vs_kl.png", "length_vs_reward.png", "qrpo_sweeps.png", "main.csv", "main_table.md"):
        assert (results / name).stat().st_size > 0
    # every QRPO run trained
    for path in (work / "runs").glob("qrpo-*/result.json"):
        result = json.loads(path.read_text())
        assert result["train"]["steps"] >= 1

    # Resume: a second invocation finds every stage done and retrains nothing.
    stamps = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")}
    assert run.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")} == stamps
    sys.modules.pop("experiment_run", None)


def test_comparison_profile_is_the_main_group_with_fewer_references():
    run = _load_run_module()
    config = str(REPO / "experiments" / "config.yaml")
    full, comparison = run.load_config(config, None, []), run.load_config(config, "comparison", [])
    assert comparison["groups"] == ["main"] and full["groups"][0] == "main" and len(full["groups"]) > 1
    assert comparison["references"]["num_ref_rewards"] < full["references"]["num_ref_rewards"]
    assert comparison["references"]["num_candidates"] == full["references"]["num_candidates"]
    assert comparison["work_dir"] != full["work_dir"] and comparison["results_dir"] != full["results_dir"]
    specs = run.run_specs(comparison)
    assert len(specs) == len(run.METHODS) * len(comparison["eval"]["seeds"])
    n = comparison["references"]["num_ref_rewards"]
    assert all(s["num_ref_rewards"] == n for s in specs if s["method"] == "qrpo")
    with pytest.raises(SystemExit):
        run.main(["--quick", "--comparison", "--report_only"])
    sys.modules.pop("experiment_run", None)
