"""The GPU benchmark script (benchmarks/gpu/run.sh) rehearsed on the CPU: the same script, the same benchmarks, with
DEVICE=cpu, the tiny model, the smoke workloads and the GPU's dtype (bfloat16 weights and autocast).

No timing is asserted (CPU timings of a 4M model say nothing about a GPU); what is asserted holds on any machine:
every benchmark wrote its results into the folder given, in the dtype asked for, QRPO's step-0 log-ratio is exactly 0
(policy == reference) and its log-probs were checked against a float64 forward.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "run.sh"
BENCHMARKS = ("train_step", "precompute", "generation")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-rehearsal")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        DEVICE="cpu",
        DTYPE="bfloat16",
        SIZES="tiny",
        TRAIN_ARGS="--smoke --e2e-steps 0",
        GEN_ARGS="--smoke",
        CUDA_VISIBLE_DEVICES="",
        WHEEL_DIR=str(out / "no-wheels"),  # the installed packages, not carried wheels
        TRL_QRPO_BENCH_CACHE=str(out / "cache"),
        MPLBACKEND="Agg",
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out / "results")], capture_output=True, text=True, env=env, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out / "results"


@pytest.mark.slow
def test_every_benchmark_wrote_its_results(run_dir):
    for bench in BENCHMARKS:
        payload = json.loads((run_dir / f"{bench}-tiny.json").read_text())
        assert payload["args"]["device"] == "cpu" and payload["args"]["dtype"] == "bfloat16"
        assert payload["machine"]["gpu"] is None
    assert "== generation tiny" in (run_dir / "run.log").read_text()


@pytest.mark.slow
def test_training_in_bf16_checks_and_ratios(run_dir):
    for bench, ratio in (("train_step", "qrpo/dpo"), ("precompute", "qrpo_pre/qrpo")):
        result = json.loads((run_dir / f"{bench}-tiny.json").read_text())["results"][0]
        checks = result["checks"]
        assert checks["step0_logratio"]["exactly_zero"] is True and checks["step0_logratio"]["max_abs"] == 0.0
        error = checks["logprob_error_vs_fp64"]
        assert len(error["per_sequence"]) == checks["step0_logratio"]["sequences"]
        assert 0 < error["max"] < float("inf")  # bf16 against fp64: a rounding error, finite
        assert result["ratios"][ratio]["median_of_ratios"] > 0
        assert all(memory["measure"].startswith("RSS") for memory in result["memory"].values())


@pytest.mark.slow
def test_generation_in_bf16(run_dir):
    result = json.loads((run_dir / "generation-tiny.json").read_text())["results"][0]
    assert result["runs"]["generate_refs"]["tokens"] > 0 and result["ratio_tokens_per_s"] > 0
