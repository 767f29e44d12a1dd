"""Smoke test of experiments/run.py: the whole pipeline (references, scores, pairs, pi_ref evaluation, QRPO / DPO /
SimPO / REBEL training and evaluation, a QRPO sweep run, tables and plots) with the tiny offline model, then a
second invocation that must find everything done (resume); and the configuration: profiles, flags, committed files."""

import dataclasses
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "experiments" / "run.py"
CONFIG = str(REPO / "experiments" / "config.yaml")

REWARD_MODULE = '''
def letter_e(prompts, completions, **kwargs):
    """A deterministic pointwise reward that varies on the tiny model's gibberish: the share of the letter e."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [t.count("e") / max(len(t), 1) for t in texts]
'''


def _load_run_module():
    """experiments/run.py as a module; it puts experiments/ on sys.path, so `config`, `plan`, `runs` import after."""
    spec = importlib.util.spec_from_file_location("experiment_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags(**options) -> list[str]:
    """Command-line flags: lists as several values, dicts as YAML."""
    argv = []
    for name, value in options.items():
        values = value if isinstance(value, list) else [value]
        argv += [f"--{name}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values)]
    return argv


# A profile on the tiny model, small: 8 training and 4 evaluation prompts, 6 reference rewards, 12-token samples.
TINY_OPTIONS = {
    "reward": "smoke_reward_e:letter_e",
    "split_num_train": 8,
    "split_num_eval": 4,
    "references_num_ref_rewards": 6,
    "references_max_new_tokens": 12,
    "references_batch_size": 32,
    "references_chunk_size": 4,
    "eval_max_new_tokens": 12,
}


def _tiny_profile(profile, tiny_model_dir, tmp_path, monkeypatch, **options):
    """run.py as a module, its work and results folders, and the argv of `--profile` on the tiny model with the
    letter-e reward (TINY_OPTIONS, then `options`)."""
    (tmp_path / "smoke_reward_e.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _load_run_module()
    work, results = tmp_path / "work", tmp_path / "results"
    flags = _flags(model=tiny_model_dir, work_dir=work, results_dir=results, **(TINY_OPTIONS | options))
    return run, work, results, [f"--{profile}", *flags]


@pytest.mark.slow
def test_experiment_pipeline_quick(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "smoke_reward_e.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _load_run_module()
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--quick"] + _flags(
        model=tiny_model_dir,
        work_dir=work,
        results_dir=results,
        reward="smoke_reward_e:letter_e",
        sweep_transforms={"log": [0.1]},
        sweep_num_ref_rewards=[1],
    )
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
    from config import METHODS, load_config
    from plan import run_specs

    full, comparison = load_config(CONFIG), load_config(CONFIG, "comparison")
    assert comparison.groups == ["main"] and full.groups[0] == "main" and len(full.groups) > 1
    assert comparison.references_num_ref_rewards < full.references_num_ref_rewards
    assert comparison.references_num_candidates == full.references_num_candidates
    assert comparison.work_dir != full.work_dir and comparison.results_dir != full.results_dir
    specs = run_specs(comparison)
    assert len(specs) == len(METHODS) * len(comparison.eval_seeds)
    n = comparison.references_num_ref_rewards
    assert all(s["num_ref_rewards"] == n for s in specs if s["method"] == "qrpo")
    with pytest.raises(SystemExit):
        run.main(["--quick", "--comparison", "--report_only"])
    sys.modules.pop("experiment_run", None)


def test_options_flags_and_files():
    """Every option is documented and has a default; flags override the file and its profile; a config file in the
    nested layout of earlier versions loads the same as its flat names."""
    _load_run_module()
    from config import ExperimentConfig, RunOptions, flatten, load_config

    for cls in (ExperimentConfig, RunOptions):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f.name
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
    assert load_config(CONFIG) == ExperimentConfig()  # the file holds the profiles only: the defaults are the run
    quick = load_config(CONFIG, "quick", ("--train_epochs", "3", "--sweep_transforms", "{log: [0.3]}"))
    assert quick.train_epochs == 3 and quick.sweep_transforms == {"log": [0.3]}
    assert quick.split_num_train < ExperimentConfig().split_num_train  # the profile, under the flags
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    nested = {"train": {"epochs": 2, "lora": {"r": 4}}, "frontier_sweep": {"betas": {"dpo": [1]}}}
    assert flatten(nested, names) == {"train_epochs": 2, "train_lora": {"r": 4}, "frontier_sweep_betas_dpo": [1]}


def test_committed_frontier_config_is_the_frontier_profile():
    """docs/experiments/frontier/config.yaml (written by report.py for the committed frontier results, threads set
    to 2 for that run) loads back to what --frontier runs."""
    _load_run_module()
    from config import load_config

    committed = load_config(REPO / "docs" / "experiments" / "frontier" / "config.yaml")
    assert committed == load_config(CONFIG, "frontier", ("--threads", committed.threads))


def test_committed_residuals_config_is_the_residuals_profile():
    """docs/experiments/residuals/config.yaml (the committed residual study, run with --threads 2) loads back to what
    --residuals runs, every run of `residuals_runs` included."""
    _load_run_module()
    from config import load_config

    committed = load_config(REPO / "docs" / "experiments" / "residuals" / "config.yaml")
    assert committed == load_config(CONFIG, "residuals", ("--threads", committed.threads))
    assert len(committed.residuals_runs) == 10


def test_committed_powered_config_is_the_powered_profile():
    """docs/experiments/powered/config.yaml (the committed powered comparison, run with --threads 2) loads back to
    what --powered runs, and its results hold every planned test run (QRPO's betas and DPO's betas on both of its
    arms, each at every eval seed: (4 + 2 x 3) x 4 = 40)."""
    _load_run_module()
    from config import load_config

    committed = load_config(REPO / "docs" / "experiments" / "powered" / "config.yaml")
    assert committed == load_config(CONFIG, "powered", ("--threads", committed.threads))
    results = json.loads((REPO / "docs" / "experiments" / "powered" / "results.json").read_text())
    powered = [r for r in results["runs"] if r["groups"] == ["powered"]]
    betas_per_seed = len(committed.powered_betas_qrpo) + 2 * len(committed.powered_betas_dpo)
    assert len(powered) == betas_per_seed * len(committed.eval_seeds) == 40
    assert all(len(p["seeds"]) == len(committed.eval_seeds) for p in results["powered"]["reward"]["points"])


@pytest.mark.parametrize("name", ["frontier", "residuals"])
def test_report_from_committed_results_json_rebuilds_the_same_tables(tmp_path, name):
    """--report_from: the committed results.json restored into run folders (restore_work_dir) and reported again gives
    the committed aggregate rows (every mean, std and standard error, the residual study's step-by-step figures), and
    a second report from the rebuilt results.json gives the same again (nothing lost on the way)."""
    _load_run_module()
    from config import load_config
    from report import build_report, restore_work_dir

    committed_dir = REPO / "docs" / "experiments" / name
    cfg = load_config(committed_dir / "config.yaml")
    committed = json.loads((committed_dir / "results.json").read_text())
    rebuilt = []
    source = committed_dir / "results.json"
    for i in range(2):
        work, results = tmp_path / f"work{i}", tmp_path / f"results{i}"
        work.mkdir()
        restore_work_dir(source, work)
        rebuilt.append(build_report(cfg, work, results))
        source = results / "results.json"
    table = {"frontier": "frontier", "residuals": "residuals"}[name]
    for row, expected in zip(rebuilt[0][table], committed[table], strict=True):
        for key, value in expected.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-15), (key, row.get("curve", row.get("name")))
            else:
                assert row[key] == value, key
        for key in row:  # every metric with a std also has its standard error, std / sqrt(seeds)
            if key.endswith("_std") and row[key] is not None:
                se = row[key.removesuffix("_std") + "_se"]
                assert se == pytest.approx(row[key] / math.sqrt(row["num_seeds"]))
    assert rebuilt[1][table] == rebuilt[0][table]
    assert [r["train_log"] for r in rebuilt[1]["runs"]] == [r.get("train_log", []) for r in committed["runs"]]
    assert all(r["train_info"] == rebuilt[0]["runs"][i]["train_info"] for i, r in enumerate(rebuilt[1]["runs"]))
    if name == "frontier":  # the sequences per step, not kept per run before train_info, came from the rows
        assert {r["sequences_per_step"] for r in rebuilt[0]["frontier"]} == {8}
        assert "standard error" in (tmp_path / "results0" / "frontier_table.md").read_text()


def test_restore_work_dir_refuses_what_it_cannot_rebuild(tmp_path):
    """A folder that holds runs already, and a powered comparison (its samples are not in results.json), are refused."""
    _load_run_module()
    from report import restore_work_dir

    source = REPO / "docs" / "experiments" / "residuals" / "results.json"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "runs").mkdir()
    with pytest.raises(SystemExit, match="not empty"):
        restore_work_dir(source, tmp_path / "busy")
    powered = json.loads(source.read_text()) | {"powered": {"reward": {}}}
    (tmp_path / "powered.json").write_text(json.dumps(powered))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="samples"):
        restore_work_dir(tmp_path / "powered.json", tmp_path / "empty")


def test_frontier_profile_run_specs():
    """The --frontier plan: every method x beta x seed on the pairs, the pointwise QRPO group, the matching rule."""
    run = _load_run_module()
    from config import METHODS, load_config
    from plan import run_id, run_specs, train_steps

    full, frontier = load_config(CONFIG), load_config(CONFIG, "frontier")
    assert frontier.groups == ["frontier", "pointwise"]
    assert frontier.results_dir == str(REPO / "docs" / "experiments" / "frontier")
    assert frontier.work_dir not in (full.work_dir, load_config(CONFIG, "comparison").work_dir)
    seeds = frontier.eval_seeds
    assert len(seeds) >= 2
    specs = run_specs(frontier)
    ids = [run_id(s) for s in specs]
    assert len(ids) == len(set(ids))
    by_key = {(s["method"], s.get("data", "pairs"), s["beta"], s["seed"]): s for s in specs}
    for method in METHODS:
        betas = frontier.frontier_betas(method)
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
        (b, s) for b in frontier.frontier_sweep_pointwise_betas for s in seeds
    }
    assert all(run_id(s).startswith("qrpo-pointwise-") for s in pointwise)
    n_pairs = sum(len(frontier.frontier_betas(m)) for m in METHODS) * len(seeds)
    assert len(specs) == n_pairs + len(frontier.frontier_sweep_pointwise_betas) * len(seeds)
    # Matching rule: the pointwise run takes the pair runs' steps with 2 x batch rows per step (a pair = 2 sequences);
    # with every prompt paired, that is exactly one epoch over all num_candidates samples of each prompt.
    prompts, C = frontier.split_num_train, frontier.references_num_candidates
    steps = train_steps(frontier, prompts)
    assert steps > train_steps(full, prompts)  # longer than the comparison's 12 steps
    assert steps * 2 * frontier.train_batch_size == prompts * C
    # the other profiles' plans and run ids are unchanged
    full_ids = [run_id(s) for s in run_specs(full)]
    assert len(full_ids) == 27 and "qrpo-identity-b0.1-n50-s0" in full_ids
    assert not any("data" in s for s in run_specs(full))
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

    run, work, results, argv = _tiny_profile(
        "frontier",
        tiny_model_dir,
        tmp_path,
        monkeypatch,
        frontier_sweep_betas_qrpo=[0.1, 0.03],
        frontier_sweep_betas_dpo=[0.1],
        frontier_sweep_betas_simpo=[2.5],
        frontier_sweep_betas_rebel=[0.2],
        frontier_sweep_pointwise_betas=[0.1],
        frontier_sweep_kl_grid=[0.0001],
    )
    assert run.main(argv) == 0
    from config import ExperimentConfig, load_config
    from plan import train_steps

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
    ran = ExperimentConfig(**json.loads((work / "config.json").read_text()))
    assert pair_steps == {train_steps(ran, len(pairs))}
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
        assert r["reward_se"] == pytest.approx(r["reward_std"] / math.sqrt(2))  # "±" and bars: s.e. over seeds
    assert summary["reference"]["num_seeds"] == 2
    for name in ("frontier.png", "frontier.csv", "frontier_table.md"):
        assert (results / name).stat().st_size > 0
    assert not (results / "main.csv").exists()  # the comparison's tables belong to other profiles
    # the exact configuration beside the results: loading it again gives the configuration that ran
    assert load_config(results / "config.yaml") == ran
    table = (results / "frontier_table.md").read_text()
    assert "QRPO pointwise (all samples) | 0.1 | 2 |" in table and "KL = 0.0001" in table

    stamps = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")}
    assert run.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")} == stamps
    sys.modules.pop("experiment_run", None)


@pytest.mark.slow  # starts a subprocess
def test_auto_threads_sees_other_processes_now():
    """threads: auto counts the cores other processes use now (not this process's own work, not the lagging load
    average): a child spinning on one core is seen, and with it busy `auto` takes 1 thread."""
    import subprocess

    import torch

    _load_run_module()
    import runs

    threads = torch.get_num_threads()
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 30: pass"]
    )
    try:
        time.sleep(0.5)
        assert runs.busy_cores_of_others(interval=1.0) >= 0.5
        assert runs.set_threads("auto") == 1
        assert runs.set_threads(2) == 2
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(threads)


def test_residuals_profile_tiny(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny --residuals run: each run of `residuals_runs` with its own options, the step probe at every step (its
    "before" residual is the trainer's own pre-step residual), a live reference equal to the precomputed one, the
    table, plot and configuration; then resume."""
    runs = {
        "pairs": {"beta": 0.5},
        "pairs-live": {"beta": 0.5, "reference": "live"},
        "sides": {"beta": 0.5, "data": "pair_sides", "learning_rate": 1e-5, "warmup_ratio": 0.5},
        "rebel": {"method": "rebel", "beta": 0.2, "epochs": 1},
    }
    run, work, results, argv = _tiny_profile(
        "residuals",
        tiny_model_dir,
        tmp_path,
        monkeypatch,
        residuals_runs=runs,
    )
    assert run.main(argv) == 0
    from datasets import load_from_disk

    num_pairs = len(load_from_disk(str(work / "pairs")))
    by_name = {}
    for path in (work / "runs").glob("*/result.json"):
        result = json.loads(path.read_text())
        by_name[result["name"]] = result
    assert set(by_name) == set(runs)
    steps_per_epoch = -(-num_pairs // 4)
    for name, result in by_name.items():
        log = [h for h in result["train"]["log_history"] if "loss" in h]
        expected_epochs = runs[name].get("epochs", 2)
        assert len(log) == result["train"]["steps"] == steps_per_epoch * expected_epochs
        assert result["learning_rate"] == runs[name].get("learning_rate", 3e-5)
        for step in log:
            for key in ("probe/residual_before_rms", "probe/residual_after_rms", "probe/logratio_change_abs_mean"):
                assert math.isfinite(step[key])
            # the probe's "before" is the batch the step's loss saw, with the same weights
            own = math.sqrt(step["loss"]) if name == "rebel" else step["residual/rms"] / result["beta"]
            assert step["probe/residual_before_rms"] == pytest.approx(own, rel=1e-4, abs=1e-5)
        assert max(h["probe/logratio_change_abs_mean"] for h in log) > 0  # steps move the sequences they are taken on
    assert (
        by_name["sides"]["train"]["data"] == "pair_sides" and by_name["sides"]["train"]["train_rows"] == 2 * num_pairs
    )
    # the live reference model and the precomputed pass give the same first step
    first = [next(h for h in by_name[n]["train"]["log_history"] if "loss" in h) for n in ("pairs", "pairs-live")]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5)
    assert first[0]["probe/residual_after_rms"] == pytest.approx(first[1]["probe/residual_after_rms"], rel=1e-3)

    summary = json.loads((results / "results.json").read_text())
    assert {r["name"] for r in summary["residuals"]} == set(runs)
    assert all(r["residual_epoch1_nats"] is not None for r in summary["residuals"])
    assert summary["methods"] == []  # the residual runs are not a method comparison
    for name in ("residuals_table.md", "residuals.csv", "residuals.png"):
        assert (results / name).stat().st_size > 0
    from config import load_config

    assert load_config(results / "config.yaml") == run.parse_args(argv)[0]
    stamps = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")}
    assert run.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")} == stamps
    sys.modules.pop("experiment_run", None)


def test_residual_run_options_are_checked():
    run = _load_run_module()  # noqa: F841  (puts experiments/ on sys.path)
    from config import load_config
    from plan import residual_spec, run_id

    cfg = load_config(CONFIG, "residuals")
    spec = residual_spec(cfg, "x", {"beta": 1, "learning_rate": 1e-6}, 0)
    assert spec["learning_rate"] == 1e-6 and spec["warmup_ratio"] == cfg.train_warmup_ratio and spec["epochs"] == 2
    assert run_id(spec) == "residuals-x-s0"
    for bad, message in (
        ({"lr": 1e-6}, "unknown options"),
        ({"method": "dpo"}, "QRPOTrainer"),
        ({"method": "rebel", "data": "pointwise"}, "REBEL: pairs"),
        ({"reference": "none"}, "precomputed"),
    ):
        with pytest.raises(ValueError, match=message):
            residual_spec(cfg, "x", bad, 0)
    sys.modules.pop("experiment_run", None)


def test_powered_profile_tiny(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny --powered run: learning rates picked per arm on the validation prompts, then every arm at its betas and
    seeds at its picked rate, the same steps and sequences per step for every arm, DPO's all-pairs control drawn from
    the candidates' pairs; then resume."""
    from datasets import load_from_disk

    run, work, results, argv = _tiny_profile(
        "powered",
        tiny_model_dir,
        tmp_path,
        monkeypatch,
        split_num_validation=3,
        references_num_candidates=4,
        eval_num_samples=2,
        eval_seeds=[0, 1],
        powered_betas_qrpo=[0.1],
        powered_betas_dpo=[0.1],
        powered_learning_rates=[1e-5, 1e-4],
        powered_bootstrap=200,
    )
    assert run.main(argv) == 0
    from plan import POWERED_ARMS, selected_learning_rates, train_steps
    from report import POWERED_LABELS

    cfg = run.parse_args(argv)[0]
    split = json.loads((work / "prompts.json").read_text())
    assert [len(split[k]) for k in ("train", "eval", "validation")] == [8, 4, 3]
    assert not set(split["validation"]) & (set(split["eval"]) | set(split["train"]))
    pairs = load_from_disk(str(work / "pairs"))
    scored = load_from_disk(str(work / "scored"))
    all_pairs = load_from_disk(str(work / "all_pairs"))
    assert len(all_pairs) == train_steps(cfg, len(pairs)) * 4
    for row in all_pairs:  # a pair of two of the prompt's first 4 candidates, the higher reward chosen
        refs = scored[row["prompt_index"]]
        i, j = refs["ref_completions"].index(row["chosen"]), refs["ref_completions"].index(row["rejected"])
        assert i < 4 and j < 4 and row["chosen_reward"] == refs["ref_rewards"][i] > refs["ref_rewards"][j]
    assert len({json.dumps([r["prompt_index"], r["chosen"], r["rejected"]]) for r in all_pairs}) == len(all_pairs)

    results_by_id = {p.parent.name: json.loads(p.read_text()) for p in (work / "runs").glob("*/result.json")}
    selection = [r for r in results_by_id.values() if r["groups"] == ["lr_select"]]
    powered = [r for r in results_by_id.values() if r["groups"] == ["powered"]]
    assert len(selection) == len(POWERED_ARMS) * 2 and len(powered) == len(POWERED_ARMS) * 2  # 1 beta x 2 seeds
    assert {r["eval"]["num_samples"] for r in selection} == {3 * 2}  # validation prompts x samples
    assert {r["eval"]["num_samples"] for r in powered} == {4 * 2}
    chosen = selected_learning_rates(cfg, work)
    assert set(chosen) == set(POWERED_ARMS)
    for arm, lr in chosen.items():
        candidates = [r for r in selection if (r["method"], r["data"]) == arm]
        allowed = [r for r in candidates if r["eval"]["kl"] <= cfg.powered_max_kl] or candidates
        assert lr == max(allowed, key=lambda r: (r["eval"]["reward"], -r["learning_rate"]))["learning_rate"]
        assert {r["learning_rate"] for r in powered if (r["method"], r["data"]) == arm} == {lr}
    steps = {(r["train"]["steps"], r["train"]["sequences_per_step"]) for r in powered + selection}
    assert steps == {(train_steps(cfg, len(pairs)), 8)}

    summary = json.loads((results / "results.json").read_text())["powered"]
    assert {p["method"] for p in summary["reward"]["points"]} == set(POWERED_LABELS.values())
    for point in summary["reward"]["points"]:
        assert point["seeds"] == [0, 1] and point["reward_se"] is not None
    for key in ("reward", "length_controlled_reward"):
        for row in summary[key]["comparisons"]:  # QRPO against each DPO arm, at KLs both curves cover
            assert row["a"] == POWERED_LABELS[("qrpo", "pointwise")] and row["b"] != row["a"]
            if row["difference"] is not None:
                assert row["ci_low"] <= row["ci_high"] and 0 <= row["p_a_better"] <= 1
    for name in ("powered_table.md", "powered.csv", "powered.png", "config.yaml"):
        assert (results / name).stat().st_size > 0

    stamps = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")}
    assert run.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/result.json")} == stamps
    sys.modules.pop("experiment_run", None)
