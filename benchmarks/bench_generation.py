"""Reference generation: trl_qrpo.precompute.generate_references against a plain batched generate loop (issue item 4),
and the vLLM backend against a plain `vllm.LLM.generate` loop and against transformers (issue 11).

    python benchmarks/bench_generation.py                          # CPU, transformers; defaults: tiny,60m, ~2-3 min
    python benchmarks/bench_generation.py --sizes 60m --prompts 32 --num-generations 4 --max-new-tokens 128
    # vLLM on CPU: the same script with the vLLM environment's python (tools/setup_vllm_env.sh, docs/vllm.md)
    $TRL_QRPO_VLLM_PYTHON benchmarks/bench_generation.py --sizes smollm2-135m --name generation_vllm_cpu
    # on a GPU machine with vLLM installed (pip install vllm):
    python benchmarks/bench_generation.py --backends transformers,vllm --sizes 60m,smollm2-135m --device cuda
    python benchmarks/bench_generation.py --device cuda --dtype bfloat16 --sizes 0.5b --out-dir OUT   # no vLLM

Both sides get the same loaded model, the same prompts, `num_generations` samples per prompt, the same batch size
(sequences per generate call) and max_new_tokens, and sample the model's own distribution (temperature 1, top_p 1,
no top_k). Throughput counts the tokens actually generated (up to and including the first EOS), not the maximum.

  plain           `model.generate(do_sample=True, top_k=0)` on left-padded batches, then `batch_decode`
  generate_refs   `generate_references(backend="transformers")`: per-completion seeds (its own logits processor),
                  tokenisation as the trainer does it, decoding, truncation flags, a datasets.Dataset out
  vllm            a plain `vllm.LLM.generate` call: one request of `SamplingParams(n=num_generations, seed)` per
                  prompt (token ids in, no detokenisation), on the engine that `vllm_sampler` uses
  vllm_sampler    our `VLLMSampler.sample` on that same engine: one seeded request per completion, stop tokens cut,
                  decoding with the transformers tokenizer (target: >= 0.95x the tokens/s of `vllm`)
  vllm_refs       `generate_references(backend="vllm")` end to end, its own engine start included (one run)

The vLLM rows need vLLM importable (on CPU: the vLLM CPU environment; on GPU: pip install vllm). Runs alternate
(plain, ours, plain, ours, ...) and the median over --repeats is reported. Writes <out-dir>/<name>.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import common

VLLM_MEMORY = 0.35


def make_prompts(n: int, words: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    vocab = common.word_list()
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(words // 2, words))) for _ in range(n)]


def count_new_tokens(rows, stops: set[int], pad_id: int) -> int:
    total = 0
    for ids in rows:
        n = 0
        for token in ids:
            n += 1
            if token in stops:
                break
        else:  # no stop token: trailing padding is not generated text (left-padded prompts pad on the left only)
            while n and ids[n - 1] == pad_id and pad_id not in stops:
                n -= 1
        total += n
    return total


def plain_loop(model, tokenizer, prompts, num_generations, max_new_tokens, batch_size, seed):
    """The baseline: batched model.generate(do_sample=True) over the same jobs, decoded with batch_decode."""
    import torch

    torch.manual_seed(seed)
    jobs = [p for p in prompts for _ in range(num_generations)]
    tokenizer.padding_side = "left"
    stops = {tokenizer.eos_token_id}
    tokens, texts = 0, []
    with torch.inference_mode():
        for start in range(0, len(jobs), batch_size):
            enc = tokenizer(jobs[start : start + batch_size], return_tensors="pt", padding=True).to(model.device)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            tokens += count_new_tokens(new.tolist(), stops, tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return tokens, len(texts)


def ours(model, tokenizer, prompts, num_generations, max_new_tokens, batch_size, seed, backend="transformers", **vllm):
    """`generate_references` on `model` (a loaded model for transformers, a folder for vLLM); (tokens, sequences)."""
    from datasets import Dataset

    from trl_qrpo.precompute import GenerateConfig, generate_references

    config = GenerateConfig(
        model_name_or_path=model if isinstance(model, str) else None,
        num_generations=num_generations,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        backend=backend,
        dtype="auto" if backend == "transformers" else "float32",
        chunk_size=max(64, len(prompts)),
        **vllm,
    )
    out = generate_references(Dataset.from_dict({"prompt": prompts}), config, model, tokenizer)
    return sum(sum(row) for row in out["ref_num_tokens"]), sum(len(row) for row in out["ref_num_tokens"])


def vllm_plain(llm, prompt_ids, num_generations, max_new_tokens, seed):
    """The baseline: one `llm.generate` call, a request of n samples per prompt; (tokens, sequences)."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=num_generations,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        max_tokens=max_new_tokens,
        seed=seed,
        detokenize=False,
    )
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outputs for c in o.outputs), sum(len(o.outputs) for o in outputs)


def run_size(size: str, args) -> dict:
    import logging

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("trl_qrpo").setLevel(
        logging.ERROR
    )  # random-init models rarely sample EOS: no truncation warning
    path = common.model_dir(size, dtype=args.dtype, device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    prompts = make_prompts(args.prompts, args.prompt_words)
    result = {"size": size, "parameters": common.num_parameters(path), "runs": {}}
    print(f"\n== {size}: {result['parameters'] / 1e6:.1f}M parameters", flush=True)
    kwargs = dict(
        prompts=prompts,
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=0,
    )
    methods = {
        "plain": lambda: plain_loop(model, tokenizer, **kwargs),
        "generate_refs": lambda: ours(model, tokenizer, **kwargs),
    }
    # warm-up (first-call costs: lazy imports, allocator)
    small = dict(kwargs, prompts=prompts[:2], max_new_tokens=4)
    plain_loop(model, tokenizer, **small)
    ours(model, tokenizer, **small)
    runs = {name: [] for name in methods}
    for rep in range(args.repeats):
        order = list(methods) if rep % 2 == 0 else list(methods)[::-1]
        for name in order:
            gc.collect()
            start = time.perf_counter()
            tokens, sequences = methods[name]()
            elapsed = time.perf_counter() - start
            runs[name].append(
                {"s": elapsed, "tokens": tokens, "sequences": sequences, "tokens_per_s": tokens / elapsed}
            )
    methods.clear()  # the closures hold the model: let it go before vLLM starts
    model = None
    gc.collect()

    if "vllm" in args.backends:
        runs.update(run_vllm(path, tokenizer, prompts, args))
    for name, rs in runs.items():
        if not rs or "not_measured" in rs[0]:
            result["runs"][name] = rs[0] if rs else {"not_measured": "skipped"}
            continue
        result["runs"][name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "s": statistics.median(r["s"] for r in rs),
            "tokens": rs[0]["tokens"],
            "sequences": rs[0]["sequences"],
            "repeats": rs,
        }
    plain, mine = result["runs"]["plain"], result["runs"]["generate_refs"]
    result["ratio_tokens_per_s"] = mine["tokens_per_s"] / plain["tokens_per_s"]
    vllm, wrapper = result["runs"].get("vllm", {}), result["runs"].get("vllm_sampler", {})
    if "tokens_per_s" in vllm and "tokens_per_s" in wrapper:
        result["ratio_vllm_sampler_tokens_per_s"] = wrapper["tokens_per_s"] / vllm["tokens_per_s"]
        result["ratio_vllm_vs_transformers_tokens_per_s"] = vllm["tokens_per_s"] / plain["tokens_per_s"]
    return result


def run_vllm(path, tokenizer, prompts, args) -> dict:
    import importlib.util
    import os

    import torch

    names = ("vllm", "vllm_sampler", "vllm_refs")
    if importlib.util.find_spec("vllm") is None:
        reason = "not measured (vllm not importable: run with the vLLM environment's python, docs/vllm.md)"
        return {name: [{"not_measured": reason}] for name in names}
    from trl_qrpo.precompute import GenerateConfig
    from trl_qrpo.precompute.samples import sample_seed
    from trl_qrpo.precompute.vllm_sampler import VLLMSampler
    from trl_qrpo.tokenization import tokenize_prompt

    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    engine = {
        "vllm_enforce_eager": not on_gpu,
        "vllm_max_model_length": args.vllm_max_model_length,
        "vllm_gpu_memory_utilization": VLLM_MEMORY,
    }
    config = GenerateConfig(
        model_name_or_path=str(path),
        backend="vllm",
        dtype=args.dtype,
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        seed=0,
        **engine,
    )
    start = time.perf_counter()
    sampler = VLLMSampler(str(path), tokenizer, config)  # one engine for the plain loop and the wrapper
    engine_start = time.perf_counter() - start
    prompt_ids = [tokenize_prompt(tokenizer, {"prompt": p}) for p in prompts]
    seeds = [[sample_seed(0, i, j) for j in range(args.num_generations)] for i in range(len(prompts))]

    def plain():
        return vllm_plain(sampler.llm, prompt_ids, args.num_generations, args.max_new_tokens, 0)

    def wrapped():
        samples = sampler.sample(prompt_ids, seeds)
        return sum(s.num_tokens for row in samples for s in row), sum(len(row) for row in samples)

    vllm_plain(sampler.llm, prompt_ids[:2], 1, 4, 0)  # warm-up
    sampler.sample(prompt_ids[:2], [s[:1] for s in seeds[:2]])
    runs = {name: [] for name in names}
    for rep in range(args.repeats):
        order = [("vllm", plain), ("vllm_sampler", wrapped)]
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            gc.collect()
            start = time.perf_counter()
            tokens, seqs = fn()
            elapsed = time.perf_counter() - start
            runs[name].append({"s": elapsed, "tokens": tokens, "sequences": seqs, "tokens_per_s": tokens / elapsed})
    runs["vllm"][0]["engine_start_s"] = engine_start
    sampler = None  # frees the engine before generate_references starts its own
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    # generate_references starts its own engine (its start-up is counted here): one run
    start = time.perf_counter()
    tokens, seqs = ours(
        str(path), tokenizer, prompts, args.num_generations, args.max_new_tokens, args.batch_size, 0, "vllm", **engine
    )
    elapsed = time.perf_counter() - start
    runs["vllm_refs"].append({"s": elapsed, "tokens": tokens, "sequences": seqs, "tokens_per_s": tokens / elapsed})
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,60m")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (both sides)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--backends", default="transformers,vllm", help="transformers[,vllm] (vllm rows need vllm importable)"
    )
    p.add_argument("--vllm-max-model-length", type=int, default=512, help="vLLM context length (prompt + completion)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the model's weights")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="generation")
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(  # smallest settings; flags given explicitly still win
            sizes="tiny", prompts=2, num_generations=2, max_new_tokens=4, batch_size=4, repeats=1
        )
        args = p.parse_args(argv)
    return args


COLUMNS = [
    ("size", "size"),
    ("method", "method"),
    ("tok_s", "generated tokens/s"),
    ("s", "seconds"),
    ("tokens", "tokens"),
    ("sequences", "sequences"),
    ("vs_plain", "vs plain"),
    ("note", "note"),
]


def main(argv=None):
    args = parse_args(argv)
    machine, results, load = common.run_sizes(args.sizes, lambda size: run_size(size, args))
    rows = []
    for r in results:
        for name, run in r["runs"].items():
            rows.append(
                {
                    "size": r["size"],
                    "method": name,
                    "tok_s": run.get("tokens_per_s"),
                    "s": run.get("s"),
                    "tokens": run.get("tokens"),
                    "sequences": run.get("sequences"),
                    "vs_plain": (run["tokens_per_s"] / r["runs"]["plain"]["tokens_per_s"])
                    if "tokens_per_s" in run
                    else None,
                    "note": run.get("not_measured", ""),
                }
            )
    common.print_table(
        rows,
        COLUMNS,
        title=f"Reference generation ({args.device}, {args.dtype}), {args.prompts} prompts x {args.num_generations}, "
        f"max_new_tokens {args.max_new_tokens}, batch {args.batch_size}",
    )

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 4))
        names = [n for n in results[0]["runs"] if "tokens_per_s" in results[0]["runs"][n]]
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            ax.bar(
                [k + i * width for k in range(len(results))],
                [r["runs"][name].get("tokens_per_s", 0) for r in results],
                width,
                label=name,
            )
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(results))], [r["size"] for r in results])
        ax.set_ylabel("generated tokens / s")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"Reference generation on {args.device}")

    return common.save("generation", args, machine, load, draw, results=results, table=rows)


if __name__ == "__main__":
    main()
