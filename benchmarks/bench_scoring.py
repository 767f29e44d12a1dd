"""Reward-model scoring: the vLLM backend (`VLLMRewardScorer`, vLLM's pooling runner) against the transformers backend
(`RewardModelScorer`), and our vLLM wrapper against a plain `LLM.classify` call on the same engine (issue 11).

    # vLLM must be importable: on CPU, the vLLM environment's python (tools/setup_vllm_env.sh, docs/vllm.md)
    $TRL_QRPO_VLLM_PYTHON benchmarks/bench_scoring.py                  # SmolLM2-135M reward model, 256 texts
    python benchmarks/bench_scoring.py --smoke                          # transformers rows only without vLLM

The reward model is SmolLM2-135M-Instruct's weights under a `LlamaForSequenceClassification` head drawn from a fixed
seed (saved once under the benchmark cache; see benchmarks/common.py), fp32. The texts are conversational
(prompt, completion) pairs of 20-200 words built from a fixed word list, scored as `trl qrpo score` scores them
(chat template, tokenised without special tokens, `--reward-max-length` tokens kept).

  transformers    `RewardModelScorer`: batches of --batch-size texts sorted by length, right-padded forward passes
  vllm_plain      one `llm.classify(token ids, PoolingParams(use_activation=False))` call on the engine below
  vllm_scorer     `VLLMRewardScorer.__call__` on that engine: texts built, tokenised, truncated, then the same call

Texts per second; runs alternate and the median over --repeats is reported, with the largest difference between the
two backends' rewards (they must agree within 1e-3 in fp32). Writes results/<name>.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import common

REWARD_SEED = 1234


def reward_model_dir():
    """SmolLM2's weights under a seeded random 1-label head (built once in the benchmark cache)."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    source = common.model_dir(common.SMOLLM2)
    path = common.cache_dir() / f"smollm2-135m-reward-seed{REWARD_SEED}"
    if (path / "done").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = LlamaForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    generator = torch.Generator().manual_seed(REWARD_SEED)
    with torch.no_grad():
        model.score.weight.copy_(
            torch.randn(model.score.weight.shape, generator=generator) / model.config.hidden_size**0.5
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "done").write_text("ok\n")
    return path


def make_pairs(n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    vocab = common.word_list()

    def text(k):
        return " ".join(rng.choice(vocab) for _ in range(k))

    prompts = [[{"role": "user", "content": text(rng.randint(10, 40))}] for _ in range(n)]
    completions = [[{"role": "assistant", "content": text(rng.randint(20, 200))}] for _ in range(n)]
    return prompts, completions


def timed(fn, n_texts):
    gc.collect()
    start = time.perf_counter()
    rewards = fn()
    elapsed = time.perf_counter() - start
    return rewards, {"s": elapsed, "texts": n_texts, "texts_per_s": n_texts / elapsed}


def run(args) -> dict:
    import importlib.util

    from trl_qrpo.precompute import ScoreConfig
    from trl_qrpo.precompute.scorers import RewardModelScorer

    path = reward_model_dir()
    prompts, completions = make_pairs(args.texts)
    config = ScoreConfig(
        reward_max_length=args.reward_max_length,
        reward_batch_size=args.batch_size,
        reward_dtype=args.dtype,
        device="cpu" if args.device == "cpu" else args.device,
        vllm_enforce_eager=args.device == "cpu",
        vllm_gpu_memory_utilization=0.35,
    )
    result = {"model": str(path), "runs": {}}
    hf = RewardModelScorer(str(path), config)
    lengths = [len(x) for x in hf.token_ids(prompts, completions)]
    result["tokens_per_text"] = {"mean": statistics.mean(lengths), "max": max(lengths), "min": min(lengths)}
    hf(prompts[:2], completions[:2])  # warm-up
    runs = {"transformers": [], "vllm_plain": [], "vllm_scorer": []}
    if importlib.util.find_spec("vllm") is None:
        for _ in range(args.repeats):
            _, r = timed(lambda: hf(prompts, completions), len(prompts))
            runs["transformers"].append(r)
        reason = "not measured (vllm not importable: run with the vLLM environment's python, docs/vllm.md)"
        runs["vllm_plain"] = runs["vllm_scorer"] = [{"not_measured": reason}]
    else:
        from vllm.pooling_params import PoolingParams

        from trl_qrpo.precompute.vllm_scorer import VLLMRewardScorer

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        start = time.perf_counter()
        scorer = VLLMRewardScorer(str(path), config)
        result["engine_start_s"] = time.perf_counter() - start
        ids = [{"prompt_token_ids": x} for x in scorer.token_ids(prompts, completions)]

        def plain():
            outputs = scorer.llm.classify(ids, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
            return [o.outputs.probs[0] for o in outputs]

        plain()  # warm-up
        methods = {
            "transformers": lambda: hf(prompts, completions),
            "vllm_plain": plain,
            "vllm_scorer": lambda: scorer(prompts, completions),
        }
        rewards = {}
        for rep in range(args.repeats):
            order = list(methods) if rep % 2 == 0 else list(methods)[::-1]
            for name in order:
                rewards[name], r = timed(methods[name], len(prompts))
                runs[name].append(r)
        result["max_abs_diff_vllm_vs_transformers"] = max(
            abs(a - b) for a, b in zip(rewards["vllm_scorer"], rewards["transformers"], strict=True)
        )
        result["max_abs_diff_plain_vs_scorer"] = max(
            abs(a - b) for a, b in zip(rewards["vllm_plain"], rewards["vllm_scorer"], strict=True)
        )
    for name, rs in runs.items():
        if "not_measured" in rs[0]:
            result["runs"][name] = rs[0]
            continue
        result["runs"][name] = {
            "texts_per_s": statistics.median(r["texts_per_s"] for r in rs),
            "s": statistics.median(r["s"] for r in rs),
            "texts": rs[0]["texts"],
            "repeats": rs,
        }
    base = result["runs"]["transformers"]["texts_per_s"]
    for name in ("vllm_plain", "vllm_scorer"):
        if "texts_per_s" in result["runs"][name]:
            result["runs"][name]["vs_transformers"] = result["runs"][name]["texts_per_s"] / base
    if "texts_per_s" in result["runs"]["vllm_scorer"]:
        result["ratio_scorer_vs_plain"] = (
            result["runs"]["vllm_scorer"]["texts_per_s"] / result["runs"]["vllm_plain"]["texts_per_s"]
        )
    return result


COLUMNS = [
    ("method", "method"),
    ("texts_s", "texts/s"),
    ("s", "seconds"),
    ("texts", "texts"),
    ("vs_transformers", "vs transformers"),
    ("note", "note"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (transformers)")
    p.add_argument("--reward-max-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the reward model's weights")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="scoring")
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(texts=8, repeats=1, reward_max_length=128)
        args = p.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    machine = common.machine_info()
    with common.LoadMonitor() as load:
        result = run(args)
    rows = [
        {
            "method": name,
            "texts_s": r.get("texts_per_s"),
            "s": r.get("s"),
            "texts": r.get("texts"),
            "vs_transformers": r.get("vs_transformers", 1.0 if name == "transformers" else None),
            "note": r.get("not_measured", ""),
        }
        for name, r in result["runs"].items()
    ]
    common.print_table(
        rows,
        COLUMNS,
        title=f"Reward-model scoring ({args.device}), {args.texts} texts, "
        f"{result['tokens_per_text']['mean']:.0f} tokens each on average, max length {args.reward_max_length}",
    )
    if "max_abs_diff_vllm_vs_transformers" in result:
        print(f"largest |vLLM - transformers| reward difference: {result['max_abs_diff_vllm_vs_transformers']:.2e}")

    def draw(plt):
        _fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [n for n, r in result["runs"].items() if "texts_per_s" in r]
        ax.bar(names, [result["runs"][n]["texts_per_s"] for n in names])
        ax.set_ylabel("texts / s")
        ax.set_title(f"Reward-model scoring on {args.device}")

    return common.save("scoring", args, machine, load.summary(), draw, result=result, table=rows)


if __name__ == "__main__":
    main()
