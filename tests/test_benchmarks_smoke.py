"""The benchmark scripts still run: each one with its smallest settings (--smoke), checked for the keys of its JSON.

No timing is asserted here (timings belong to benchmarks/README.md, measured on a quiet machine). Every test starts
the script in a subprocess: all are marked slow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    env = os.environ.copy()
    env["TRL_QRPO_BENCH_CACHE"] = str(tmp_path_factory.mktemp("bench-cache"))
    env["MPLBACKEND"] = "Agg"
    return env


def run(script, out_dir, env, *extra):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--out-dir", str(out_dir), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def load(out_dir, name):
    return json.loads((Path(out_dir) / f"{name}.json").read_text())


@pytest.mark.slow
def test_bench_train_step(tmp_path, bench_env):
    stdout = run("bench_train_step.py", tmp_path, bench_env)
    payload = load(tmp_path, "train_step")
    assert {"machine", "load", "results", "table", "targets"} <= set(payload)
    result = payload["results"][0]
    assert set(result["step"]) == {"dpo", "qrpo", "qrpo_pw"}
    assert {"median", "tokens_per_s", "completion_tokens_per_s"} <= set(result["step"]["qrpo"])
    assert {"median_of_ratios", "peak_over_start_ratio", "end_to_end_ratio_of_medians"} <= set(
        result["ratios"]["qrpo/dpo"]
    )
    assert {"peak_over_start_mb", "peak_over_setup_mb"} <= set(result["memory"]["qrpo"])
    assert result["memory"]["qrpo"]["measure"].startswith("RSS")
    assert payload["args"]["device"] == "cpu" and payload["args"]["dtype"] == "float32"
    # before any update: policy == reference, and QRPO's fp32 log-probs agree with a float64 forward
    checks = result["checks"]
    assert checks["step0_logratio"]["exactly_zero"] is True
    assert checks["logprob_error_vs_fp64"]["max"] < 1e-3
    assert "time / DPO" in stdout and "step-0 log-ratio exactly 0" in stdout


@pytest.mark.slow
def test_bench_precompute(tmp_path, bench_env):
    # memory and train() share bench_train_step's code, checked above
    run("bench_precompute.py", tmp_path, bench_env, "--mem-steps", "0", "--e2e-steps", "0")
    result = load(tmp_path, "precompute")["results"][0]
    assert set(result["step"]) == {"qrpo", "qrpo_pre", "dpo", "dpo_pre", "qrpo_stored"}
    assert {"qrpo_pre", "dpo_pre"} <= set(result["precompute_s"])  # qrpo_stored: its start-up check only
    assert "median_of_ratios" in result["ratios"]["qrpo_pre/qrpo"]
    assert "median_of_ratios" in result["ratios"]["qrpo_stored/dpo"] and result["ref_logps_vs_trl_precompute"] > 0


@pytest.mark.slow
def test_bench_targets(tmp_path, bench_env):
    run("bench_targets.py", tmp_path, bench_env)
    payload = load(tmp_path, "targets")
    assert {"quantiles_s", "targets_s", "total_s", "peak_over_inputs_mb"} <= set(payload["math"][0])
    assert {"quantile_map_s", "target_map_s", "maps_peak_over_start_mb", "full_prepare_s"} <= set(payload["dataset"])
    assert isinstance(payload["target_met"], bool)
    # report.py renders the results folder as the README's markdown tables
    proc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=bench_env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Target preparation" in proc.stdout


@pytest.mark.slow
def test_bench_generation(tmp_path, bench_env):
    run("bench_generation.py", tmp_path, bench_env)
    result = load(tmp_path, "generation")["results"][0]
    assert {"plain", "generate_refs", "vllm"} <= set(result["runs"])
    assert result["runs"]["generate_refs"]["tokens"] > 0
    assert "tokens_per_s" in result["runs"]["plain"] and result["ratio_tokens_per_s"] > 0


@pytest.mark.slow
def test_bench_sandbox(tmp_path, bench_env):
    run("bench_sandbox.py", tmp_path, bench_env)
    payload = load(tmp_path, "sandbox")
    assert {"results", "machine", "load", "table"} <= set(payload)
    assert payload["results"], "no backend was measured"


@pytest.mark.slow
def test_bench_prepare(tmp_path, bench_env):
    run("bench_prepare.py", tmp_path, bench_env)
    payload = load(tmp_path, "prepare")
    result = payload["results"][0]
    assert result["prepare_median_s"]["dpo"] > 0 and result["prepare_median_s"]["qrpo"] > 0
    assert result["ratio_median_of_ratios"] > 0 and isinstance(payload["target_met"], bool)
