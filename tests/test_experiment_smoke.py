"""Smoke test of experiments/run.py: the whole pipeline (references, scores, pairs, pi_ref evaluation, QRPO / DPO /
SimPO / REBEL training and evaluation, a QRPO sweep run, tables and plots) with the tiny offline model, then a
second invocation that must find everything done (resume)."""

import importlib.util
import json
import sys
import time
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


def test_frontier_profile_run_specs():
    """The --frontier plan: every method x beta x seed on the pairs, the pointwise QRPO group, the matching rule."""
    run = _load_run_module()
    config = str(REPO / "experiments" / "config.yaml")
    full, frontier = run.load_config(config, None, []), run.load_config(config, "frontier", [])
    assert frontier["groups"] == ["frontier", "pointwise"]
    assert frontier["results_dir"] == str(REPO / "docs" / "experiments" / "frontier")
    assert frontier["work_dir"] not in (full["work_dir"], run.load_config(config, "comparison", [])["work_dir"])
    seeds, grid = frontier["eval"]["seeds"], frontier["frontier_sweep"]
    assert len(seeds) >= 2
    specs = run.run_specs(frontier)
    ids = [run.run_id(s) for s in specs]
    assert len(ids) == len(set(ids))
    by_key = {(s["method"], s.get("data", "pairs"), s["beta"], s["seed"]): s for s in specs}
    for method in run.METHODS:
        betas = grid["betas"][method]
        assert len(set(betas)) >= 5
        for beta in betas:
            for seed in seeds:
                spec = by_key[(method, "pairs", float(beta), seed)]
                assert "frontier" in spec["groups"]
                # DPO on the best/worst pairs of the same samples is the pointwise group's counterpart
                assert ("pointwise" in spec["groups"]) == (method == "dpo")
    pointwise = [s for s in specs if s.get("data") == "pointwise"]
    assert all(s["method"] == "qrpo" and s["groups"] == ["pointwise"] for s in pointwise)
    assert {(s["beta"], s["seed"]) for s in pointwise} == {
        (float(b), s) for b in grid["pointwise_betas"] for s in seeds
    }
    assert all(run.run_id(s).startswith("qrpo-pointwise-") for s in pointwise)
    n_pairs = sum(len(grid["betas"][m]) for m in run.METHODS) * len(seeds)
    assert len(specs) == n_pairs + len(grid["pointwise_betas"]) * len(seeds)
    # Matching rule: the pointwise run takes the pair runs' steps with 2 x batch rows per step (a pair = 2 sequences);
    # with every prompt paired, that is exactly one epoch over all num_candidates samples of each prompt.
    prompts, t, C = frontier["split"]["num_train"], frontier["train"], frontier["references"]["num_candidates"]
    steps = run.train_steps(frontier, prompts)
    assert steps > run.train_steps(full, prompts)  # longer than the comparison's 12 steps
    assert steps * 2 * t["batch_size"] == prompts * C
    # the other profiles' plans and run ids are unchanged
    full_ids = [run.run_id(s) for s in run.run_specs(full)]
    assert len(full_ids) == 27 and "qrpo-identity-b0.1-n50-s0" in full_ids
    assert not any("data" in s for s in run.run_specs(full))
    with pytest.raises(SystemExit):
        run.main(["--frontier", "--comparison", "--report_only"])
    # the report's reading of a frontier at fixed KL: linear between the bracketing betas, None outside
    import report

    curve = [{"kl": 4.0, "reward": 0.4}, {"kl": 1.0, "reward": 0.1}, {"kl": 2.0, "reward": 0.3}]
    assert report.interpolate_reward(curve, 1.5) == pytest.approx(0.2)
    assert report.interpolate_reward(curve, 3.0) == pytest.approx(0.35)
    assert report.interpolate_reward(curve, 0.5) is None and report.interpolate_reward(curve, 5.0) is None
    sys.modules.pop("experiment_run", None)


@pytest.mark.slow
def test_experiment_frontier_tiny(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny --frontier run end to end: pair runs of every method at its betas and seeds, pointwise QRPO on all
    samples with the pair runs' steps and sequences per step, the frontier table and plot; then resume."""
    from datasets import load_from_disk

    (tmp_path / "smoke_reward_e.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _load_run_module()
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--frontier", "--model", str(tiny_model_dir), "--work_dir", str(work), "--results_dir", str(results)]
    for item in (
        "reward=smoke_reward_e:letter_e",
        "split.num_train=8",
        "split.num_eval=4",
        "references.num_ref_rewards=6",
        "references.max_new_tokens=12",
        "references.batch_size=32",
        "references.chunk_size=4",
        "eval.max_new_tokens=12",
        "frontier_sweep.betas={qrpo: [0.1, 0.03], dpo: [0.1], simpo: [2.5], rebel: [0.2]}",
        "frontier_sweep.pointwise_betas=[0.1]",
        "frontier_sweep.kl_grid=[0.0001]",
    ):
        argv += ["--set", item]
    assert run.main(argv) == 0

    pairs, pointwise = load_from_disk(str(work / "pairs")), load_from_disk(str(work / "pointwise"))
    scored = load_from_disk(str(work / "scored"))
    assert len(pairs) >= 1 and len(pointwise) == 4 * len(pairs)
    for row in pointwise:  # each of the first 4 references of a paired prompt, its own reward, quantiles vs 4..9
        refs = scored[row["prompt_index"]]
        assert row["ref_index"] < 4 and row["reward"] == refs["ref_rewards"][row["ref_index"]]
        assert row["ref_rewards"] == refs["ref_rewards"][4:10]

    results_by_id = {p.parent.name: json.loads(p.read_text()) for p in (work / "runs").glob("*/result.json")}
    assert len(results_by_id) == (2 + 1 + 1 + 1 + 1) * 2
    pair_steps = {r["train"]["steps"] for r in results_by_id.values() if r["train"]["data"] == "pairs"}
    assert pair_steps == {run.train_steps(json.loads((work / "config.json").read_text()), len(pairs))}
    assert pair_steps == {2 * -(-len(pairs) // 4)}  # 2 epochs of batches of 4 pairs
    for rid in ("qrpo-pointwise-identity-b0.1-n6-s0", "qrpo-pointwise-identity-b0.1-n6-s1"):
        train = results_by_id[rid]["train"]
        assert {train["steps"]} == pair_steps and train["data"] == "pointwise"
        assert train["rows_per_step"] == train["sequences_per_step"] == 8 and train["train_rows"] == len(pointwise)

    summary = json.loads((results / "results.json").read_text())
    rows = summary["frontier"]
    assert [(r["curve"], r["beta"]) for r in rows] == [
        ("QRPO (best/worst pairs)", 0.1),
        ("QRPO (best/worst pairs)", 0.03),
        ("QRPO pointwise (all samples)", 0.1),
        ("DPO (best/worst pairs)", 0.1),
        ("SimPO (best/worst pairs)", 2.5),
        ("REBEL (best/worst pairs)", 0.2),
    ]
    for r in rows:
        assert r["seeds"] == [0, 1] and r["samples_per_seed"] == 8
        assert r["kl_std"] is not None and r["reward_std"] is not None and r["length"] > 0
    assert summary["reference"]["num_seeds"] == 2
    for name in ("frontier.png", "frontier.csv", "frontier_table.md"):
        assert (results / name).stat().st_size > 0
    assert not (results / "main.csv").exists()  # the comparison's tables belong to other profiles
    # the exact configuration beside the results: loading it again gives the configuration that ran
    assert run.load_config(str(results / "config.yaml"), None, []) == json.loads((work / "config.json").read_text())
    table = (results / "frontier_table.md").read_text()
    assert "QRPO pointwise (all samples) | 0.1 | 2 |" in table and "KL = 0.0001" in table

    stamps = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")}
    assert run.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")} == stamps
    sys.modules.pop("experiment_run", None)


def test_auto_threads_sees_other_processes_now():
    """threads: auto counts the cores other processes use now (not this process's own work, not the lagging load
    average): a child spinning on one core is seen, and with it busy `auto` takes 1 thread."""
    import subprocess

    import torch

    run = _load_run_module()
    threads = torch.get_num_threads()
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 30: pass"])
    try:
        time.sleep(0.5)
        assert run.busy_cores_of_others(interval=1.0) >= 0.5
        assert run.set_threads("auto") == 1
        assert run.set_threads(2) == 2
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(threads)
