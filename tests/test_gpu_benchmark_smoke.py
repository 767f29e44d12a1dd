"""The GPU benchmark (benchmarks/gpu/run_h200.py) in its CPU smoke mode: every stage runs, its JSON holds the checks.

No timing is asserted (CPU timings of a 4M model say nothing about an H200); what is asserted are the properties that
hold on any machine: the step-0 log-ratio is exactly 0 (policy == reference), QRPO's sequence log-probs are within
1e-3 nats of an fp64 recomputation, every ratio and throughput is there and positive.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "run_h200.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    env = os.environ.copy()
    env.pop("OUT", None)  # the device tool's output folder must not redirect the test's files
    env["TRL_QRPO_BENCH_CACHE"] = str(out / "cache")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text(), proc.stdout


@pytest.mark.slow
def test_smoke_runs_every_stage(smoke):
    payload, markdown, stdout = smoke
    assert payload["errors"] == [] and payload["skipped"] == []
    assert payload["environment"]["gpu"] is None  # smoke mode hides any GPU: CPU only
    assert set(payload["steps"]) == set(payload["memory"]) == set(payload["generation"]) == {"tiny"}
    assert "time / DPO" in markdown and "time / DPO" in stdout


@pytest.mark.slow
def test_smoke_ratios_and_throughput(smoke):
    payload, _, _ = smoke
    summary = payload["summary"]["tiny"]
    assert summary["step_ratio"] > 0 and summary["memory_ratio"] > 0
    assert summary["memory_measure"].startswith("RSS")  # on the CPU: marked as RSS, not the CUDA allocator
    steps = payload["steps"]["tiny"]
    assert set(steps["step"]) == {"dpo", "qrpo"}
    assert len(steps["step"]["qrpo"]["times"]) == payload["args"]["steps"]
    assert all(summary["tokens_per_s"][name] > 0 for name in ("dpo", "qrpo"))
    gen = payload["generation"]["tiny"]
    short, full = gen["runs"]
    assert full["tokens"] > short["tokens"] > 0 and full["sequences"] == short["sequences"]
    assert gen["tokens_per_s_end_to_end"] > 0
    assert gen["tokens_per_s_decode"] is None or gen["tokens_per_s_decode"] > 0


@pytest.mark.slow
def test_smoke_step0_and_logprob_checks(smoke):
    payload, _, _ = smoke
    checks = payload["steps"]["tiny"]["checks"]
    assert checks["step0_logratio"]["exactly_zero"] is True and checks["step0_logratio"]["max_abs"] == 0.0
    # DPO's and QRPO's own step-0 metrics (beta * log-ratio) agree: exactly 0 too
    for metrics in payload["steps"]["tiny"]["step0_metrics"].values():
        assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/rejected"] == 0.0
    errors = checks["logprob_error_nats"]
    sequences = checks["step0_logratio"]["sequences"]
    assert all(len(e["per_sequence"]) == sequences for e in errors.values())
    assert errors["from_bf16_logits"]["max"] < 1e-3
    assert payload["summary"]["tiny"]["logprob_error_met"] is True
    # the fp64 references are independent recomputations: the whole-model fp64 forward differs from the bf16 run
    assert errors["fp64_forward"]["max"] > 0
