"""QRPO against DPO on one GPU in bf16: training steps, peak memory, log-prob checks, reference generation.

    bash benchmarks/gpu/run_h200.sh                       # on the H200: installs the carried wheels, then this script
    python benchmarks/gpu/run_h200.py                     # where trl, datasets and a CUDA GPU are already there
    python benchmarks/gpu/run_h200.py --smoke             # CPU, tiny Llama, two steps (the test suite runs it)

Models are random-init Llama configs built in code (nothing is downloaded; weights do not change the cost of a step):
`0.5b` (468M parameters: 24 x 1024, MLP 4096) and `1.5b` (1.45B: 28 x 2048, MLP 5632, 8 KV heads), sharing the
32,000-token byte-level BPE of benchmarks/common.py, saved in bf16 under a scratch folder.

Stages, each size in turn within a stage, each in fresh processes (with --smoke, `steps` runs in the main process),
results written after every stage:
  steps       one process builds TRL's DPOTrainer and QRPOTrainer (paired data, sample_selector="both": the same
              2B sequences per step; token ids checked equal) on the same weights, with bf16 weights and bf16
              autocast as `train()` would set them up (accelerate's prepare_model), reference model on the fly.
              Checks first: the step-0 log-ratio (policy == reference) must be exactly 0; QRPO's sequence log-probs
              against fp64 recomputations (see `logprob_checks`). Then `training_step` (forward, reference forward,
              loss, backward) on prepared batches, the trainers taking turns, who goes first alternating, CUDA
              synchronised around each step; after --warmup rounds, the median over rounds of the per-round ratio
              QRPO/DPO. tokens/s = non-padding tokens per second of training_step.
  memory      one fresh process per trainer: torch.cuda.max_memory_allocated over --mem-steps training steps, the
              peak counter reset right before them (the models are already in memory: peak = models + gradients +
              activations); on CPU the peak RSS (VmHWM, reset likewise) instead, marked as such.
  generation  reference generation with the package's CLI (`python -m trl_qrpo generate --backend transformers`),
              twice per size (max_new_tokens T/8 and T): end-to-end tokens/s of the full run (process start and
              model load included) and decode tokens/s = extra tokens / extra seconds of the full run over the
              short one (start-up, load and prefill cancel out).

Writes <name>.json (every raw figure, the environment) and <name>.md (the tables) to --out-dir, else $OUT (the
device tool's folder), else benchmarks/results/gpu. --time-budget-s skips the stages that would not fit (recorded
as skipped), so that the run ends within the device tool's limit with what it has.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

GPU_DIR = Path(__file__).resolve().parent
BENCH_DIR = GPU_DIR.parent
REPO_ROOT = BENCH_DIR.parent
for _path in (str(REPO_ROOT), str(BENCH_DIR)):  # the working tree's trl_qrpo first, then the benchmarks' helpers
    if _path not in sys.path:
        sys.path.insert(0, _path)

import common  # noqa: E402  (sets the offline defaults: no Hub, no progress bars)
import train_common as tc  # noqa: E402

# Llama configs by name; `tiny` (4.2M) is the smoke size, the same as benchmarks/common.py's.
SIZES = {
    "tiny": common.SIZES["tiny"],
    "0.5b": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16
    ),
    "1.5b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8
    ),
}
TARGETS = {"step_ratio": 1.02, "memory_ratio": 1.00, "logprob_error_nats": 1e-3}
VARIANTS = ("dpo", "qrpo")
STAGES = ("steps", "memory", "generation")
# Rough seconds per stage for the 0.5b model on an H200 (imports, model loads, the work), and each size's factor:
# a stage is skipped when less than that is left of --time-budget-s.
STAGE_COST_S = {"steps": 40, "memory": 35, "generation": 30}
SIZE_FACTOR = {"tiny": 0.5, "0.5b": 1.0, "1.5b": 1.6}


# ----------------------------------------------------------------------------------------------------------------
# Models, trainers, batches
# ----------------------------------------------------------------------------------------------------------------


def build_models(sizes: list[str], root: Path, device: str, dtype: str) -> dict[str, dict]:
    """Save a random-init Llama of each size (weights in `dtype`) with the shared tokenizer; {size: info}."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = common.build_tokenizer()
    out = {}
    for size in sizes:
        path = root / f"llama-{size}-{dtype}"
        start = time.perf_counter()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **SIZES[size],
        )
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU for 1.5B
            model = LlamaForCausalLM(config)
        model.to(getattr(torch, dtype))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        params = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        out[size] = {"path": str(path), "parameters": params, "build_s": time.perf_counter() - start, **SIZES[size]}
        log(f"built {size}: {params / 1e6:.1f}M parameters in {out[size]['build_s']:.1f}s -> {path}")
    return out


def build_trainer(name: str, path: str, work: tc.Workload, pairs: list[dict], output_dir: str, opts: dict):
    """TRL's DPOTrainer or QRPOTrainer on the model folder `path`, same config otherwise."""
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from trl_qrpo import QRPOConfig, QRPOTrainer

    bf16 = opts["dtype"] == "bfloat16"
    kwargs = dict(
        output_dir=output_dir,
        bf16=bf16,
        use_cpu=opts["device"] == "cpu",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-6,
        per_device_train_batch_size=work.batch_pairs,
        per_device_eval_batch_size=work.batch_pairs,
        gradient_checkpointing=work.gradient_checkpointing,
        dataloader_num_workers=0,
        max_steps=1,
        seed=work.seed,
        model_init_kwargs={"dtype": opts["dtype"]},  # the policy and the reference both load in this dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = Dataset.from_list(pairs)
    if name == "dpo":
        trainer = DPOTrainer(model=path, args=DPOConfig(**kwargs), train_dataset=dataset, processing_class=tokenizer)
    elif name == "qrpo":
        trainer = QRPOTrainer(
            model=path, args=QRPOConfig(**kwargs, beta=1e-3), train_dataset=dataset, processing_class=tokenizer
        )
    else:
        raise ValueError(f"Unknown variant {name!r}: choose from {VARIANTS}.")
    trainer.remove_callback(PrinterCallback)
    return trainer


def prepare_for_steps(trainer) -> None:
    """What `train()` does to the model before its loop: autocast as accelerate wraps it, checkpointing, train mode.

    `accelerator.prepare_model` on one process moves the model and wraps its forward in the mixed-precision
    autocast (the reference model's forward runs under `accelerator.autocast()` inside the trainers already).
    """
    trainer.model = trainer.accelerator.prepare_model(trainer.model)
    trainer.model_wrapped = trainer.model
    args = trainer.args
    if hasattr(args, "activation_checkpointing"):  # transformers >= 5.2x renamed gradient_checkpointing
        tc.enable_checkpointing(trainer)
        return
    if args.gradient_checkpointing:  # transformers 5.17 (the H200 image): what its train() does
        kwargs = dict(args.gradient_checkpointing_kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        trainer.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
        )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1


def workload(args_or_spec, size: str) -> tc.Workload:
    get = args_or_spec.get if isinstance(args_or_spec, dict) else lambda k: getattr(args_or_spec, k)
    return tc.Workload(
        size=size,
        batch_pairs=get("batch_pairs"),
        prompt_words=get("prompt_words"),
        completion_words=get("completion_words"),
        num_batches=get("num_batches"),
        gradient_checkpointing=get("gradient_checkpointing") == "on",
    )


# ----------------------------------------------------------------------------------------------------------------
# Checks: step-0 log-ratio, log-probs against fp64
# ----------------------------------------------------------------------------------------------------------------


def _kernel_tiles():
    """Token and vocabulary tile sizes of TRL's fused log-prob head (defaults of TRL 1.16 when not found)."""
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    except ImportError:
        TOKEN_CHUNK_SIZE = 4096
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as vocab_chunk
    except ImportError:
        vocab_chunk = 32768
    return TOKEN_CHUNK_SIZE, vocab_chunk


def _per_row_logps(logits, targets, rows, num_rows):
    """fp64 sum per row of log_softmax(logits)[target] (logits [N, V] of the scored positions, any dtype)."""
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1).gather(1, targets[:, None])[:, 0]
    return torch.zeros(num_rows, dtype=torch.float64, device=logp.device).index_add_(0, rows, logp)


def logprob_checks(trainer, batch, path: str, opts: dict) -> dict:
    """Step 0 (policy == reference): the log-ratios, and QRPO's sequence log-probs against fp64 recomputations.

    `logps` are the numbers QRPO's loss uses (`QRPOTrainer.sequence_log_probs`: TRL's fused LM head, per-token
    log-probs folded in fp32 from logit tiles in the autocast dtype, summed over completion tokens in fp32). The final
    hidden states of that very forward are captured with a hook, and the log-probs recomputed from them:
      from_bf16_logits  logits as the fused head's GEMM makes them (same tiles, same dtype), then log-softmax, gather
                        and sum in fp64: what QRPO's log-prob code adds to the model's own bf16 logits. The target.
      fp64_head         the LM head itself in fp64 on the same hidden states: adds the rounding of the logits to
                        bf16 inside TRL's kernel (identical for DPO, which uses the same head).
      fp64_forward      the whole model upcast to fp64 (the bf16 weights exactly), forward in fp64: the bf16 forward's
                        own rounding, reported for scale, not a target.
    """
    import torch

    model = trainer.model
    inputs = trainer._prepare_inputs(batch)
    captured = {}
    backbone = model.base_model

    def keep_first_hidden(module, args, output) -> None:  # returns None: the forward's output stays as it is
        if "h" not in captured:
            captured["h"] = output.last_hidden_state.detach()

    handle = backbone.register_forward_hook(keep_first_hidden)
    try:
        logps, ref_logps, _ = trainer.sequence_log_probs(model, inputs)
    finally:
        handle.remove()
    logps, ref_logps = logps.detach(), ref_logps.detach()
    logratio = logps - ref_logps
    out = {
        "step0_logratio": {
            "max_abs": float(logratio.abs().max()),
            "exactly_zero": bool(torch.all(logratio == 0)),
            "sequences": int(logratio.numel()),
        }
    }

    # The positions the fused head scores: labels (completion tokens) shifted by one, compacted row-major.
    input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
    mask = completion_mask[:, 1:] == 1
    targets = input_ids[:, 1:][mask]
    rows = mask.nonzero()[:, 0]
    num_rows = input_ids.shape[0]
    hidden = captured["h"][:, :-1][mask]
    weight = model.get_output_embeddings().weight.detach()
    compute_dtype = torch.bfloat16 if opts["dtype"] == "bfloat16" else hidden.dtype
    token_tile, vocab_tile = _kernel_tiles()
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        buf = torch.empty((min(len(hidden), token_tile), vocab_tile), device=hidden.device, dtype=compute_dtype)
        w = weight.to(compute_dtype)
        ref_bf16 = torch.zeros(num_rows, dtype=torch.float64, device=hidden.device)
        ref_head = torch.zeros_like(ref_bf16)
        w64 = weight.double()
        for start in range(0, len(hidden), token_tile):
            h = hidden[start : start + token_tile]
            parts = []
            for v in range(0, w.shape[0], vocab_tile):
                tile = buf[: len(h), : min(vocab_tile, w.shape[0] - v)]
                torch.mm(h.to(compute_dtype), w[v : v + vocab_tile].t(), out=tile)
                parts.append(tile.double())
            sl = slice(start, start + token_tile)
            ref_bf16 += _per_row_logps(torch.cat(parts, dim=1), targets[sl], rows[sl], num_rows)
            ref_head += _per_row_logps(h.double() @ w64.t(), targets[sl], rows[sl], num_rows)
        del buf, w, w64
    errors = {
        "from_bf16_logits": (logps.double() - ref_bf16).abs(),
        "fp64_head": (logps.double() - ref_head).abs(),
    }
    if opts.get("fp64_forward", True):
        from transformers import AutoModelForCausalLM

        # loaded as saved, onto the device, then upcast there (exact: every bf16 value is a float64 value)
        model64 = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(hidden.device).to(torch.float64).eval()
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            h64 = model64.base_model(
                input_ids=input_ids, attention_mask=inputs["attention_mask"], use_cache=False
            ).last_hidden_state[:, :-1][mask]
            w64 = model64.get_output_embeddings().weight
            ref64 = torch.zeros(num_rows, dtype=torch.float64, device=hidden.device)
            for start in range(0, len(h64), token_tile):
                sl = slice(start, start + token_tile)
                ref64 += _per_row_logps(h64[sl] @ w64.t(), targets[sl], rows[sl], num_rows)
        errors["fp64_forward"] = (logps.double() - ref64).abs()
        del model64, h64, w64
        gc.collect()
    out["logprob_error_nats"] = {
        name: {"max": float(e.max()), "mean": float(e.mean()), "per_sequence": e.tolist()}
        for name, e in errors.items()
    }
    out["logps"] = {
        "mean": float(logps.mean()),
        "completion_tokens_per_sequence": completion_mask[:, 1:].sum(dim=1).tolist(),
        "hidden_dtype": str(captured["h"].dtype),
        "compute_dtype": str(compute_dtype),
    }
    return out


# ----------------------------------------------------------------------------------------------------------------
# Workers (fresh processes)
# ----------------------------------------------------------------------------------------------------------------


def _brief_checks(checks: dict) -> dict:
    return {
        "step0_logratio_max_abs": checks["step0_logratio"]["max_abs"],
        **{f"{k}_max_err": v["max"] for k, v in checks["logprob_error_nats"].items()},
    }


def _sync(device: str):
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def steps_worker(spec: dict) -> dict:
    """Build both trainers, check step 0 and the log-probs, time alternating training steps, in-process memory."""
    import torch

    opts, work = spec["opts"], workload(spec["work"], spec["size"])
    device, sync = opts["device"], _sync(opts["device"])
    pairs = tc.make_pairs(work)
    result = {"size": spec["size"], "workload": vars(work)}
    with tempfile.TemporaryDirectory() as tmp:
        trainers, batches, init_s = {}, {}, {}
        for name in VARIANTS:
            start = time.perf_counter()
            trainers[name] = build_trainer(name, spec["path"], work, pairs, f"{tmp}/{name}", opts)
            prepare_for_steps(trainers[name])
            init_s[name] = time.perf_counter() - start
            batches[name] = tc.prepared_batches(trainers[name], work.num_batches)
            log(f"[{spec['size']}] {name} trainer built in {init_s[name]:.1f}s")
        tc.check_same_sequences(batches)
        result["init_s"] = init_s
        result["model_dtype"] = {n: str(t.model.dtype) for n, t in trainers.items()}
        result["ref_model_dtype"] = {n: str(t.ref_model.dtype) for n, t in trainers.items()}
        result["tokens_per_batch"] = [tc.batch_tokens(b)[1] for b in batches["qrpo"]]

        result["checks"] = logprob_checks(trainers["qrpo"], batches["qrpo"][0], spec["path"], opts)
        log(f"[{spec['size']}] checks: {json.dumps(_brief_checks(result['checks']))}")

        names = list(VARIANTS)
        times = {name: [] for name in names}
        first_metrics = {}
        for step in range(opts["warmup"] + opts["steps"]):
            order = names if step % 2 == 0 else names[::-1]
            for name in order:
                trainer = trainers[name]
                batch = batches[name][step % len(batches[name])]
                gc.collect()
                sync()
                start = time.perf_counter()
                trainer.training_step(trainer.model, batch)
                sync()
                elapsed = time.perf_counter() - start
                trainer.model.zero_grad(set_to_none=True)
                if step == 0:  # the implicit rewards of step 0 (policy == reference): exactly 0 for both
                    first_metrics[name] = {
                        k: v[0]
                        for k, v in trainer._metrics["train"].items()
                        if k.startswith("rewards/") or k == "implicit_reward/mean"
                    }
                if step >= opts["warmup"]:
                    times[name].append(elapsed)
        result["step0_metrics"] = first_metrics
        result["step"] = tc.step_stats(times, batches, opts["steps"])
        result["ratios"] = {"qrpo/dpo": tc.paired_ratio(times, "qrpo", "dpo")}
        log(f"[{spec['size']}] step ratio qrpo/dpo {result['ratios']['qrpo/dpo']['median_of_ratios']:.4f}")

        if device == "cuda":  # the same process, each trainer measured the same way (others' weights idle)
            mem = {}
            for name in names[::-1]:
                trainer = trainers[name]
                gc.collect()
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                for step in range(opts["mem_steps"]):
                    trainer.training_step(trainer.model, batches[name][step % len(batches[name])])
                    trainer.model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                mem[name] = {"step_peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
            mem["qrpo/dpo"] = mem["qrpo"]["step_peak_mb"] / mem["dpo"]["step_peak_mb"]
            result["memory_in_process"] = mem
        del trainers, batches
        gc.collect()
    return result


def memory_worker(spec: dict) -> dict:
    """One trainer in a fresh process: its peak memory over a few training steps."""
    import torch
    import trl  # noqa: F401  (imports first, the same for every variant)

    import trl_qrpo  # noqa: F401

    opts, work, name = spec["opts"], workload(spec["work"], spec["size"]), spec["variant"]
    cuda = opts["device"] == "cuda"
    pairs = tc.make_pairs(work)
    gc.collect()
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        start_mb = torch.cuda.memory_allocated() / 2**20
    else:
        start_mb = common.rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(name, spec["path"], work, pairs, tmp, opts)
        prepare_for_steps(trainer)
        batches = tc.prepared_batches(trainer, work.num_batches)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            setup_mb = torch.cuda.memory_allocated() / 2**20
            setup_peak_mb = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            exact = True
        else:
            setup_mb = common.rss_mb()
            setup_peak_mb = common.peak_rss_mb()
            exact = common.reset_peak_rss()
        for step in range(opts["mem_steps"]):
            trainer.training_step(trainer.model, batches[step % len(batches)])
            trainer.model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
            reserved_mb = torch.cuda.max_memory_reserved() / 2**20
        else:
            peak_mb, reserved_mb = common.peak_rss_mb(), None
    return {
        "variant": name,
        "measure": "torch.cuda.max_memory_allocated" if cuda else "RSS (VmHWM), not the CUDA allocator",
        "start_mb": start_mb,
        "after_setup_mb": setup_mb,  # policy + reference model (+ batches)
        "setup_peak_mb": setup_peak_mb,
        "peak_mb": peak_mb,  # over the steps: models + gradients + activations + temporaries
        "peak_over_start_mb": peak_mb - start_mb,  # = peak_mb on CUDA (nothing allocated at start); the ratio's figure
        "step_peak_mb": peak_mb - setup_mb,  # what the steps add
        "max_reserved_mb": reserved_mb,
        "peak_reset_exact": exact,
    }


def run_worker(spec: dict, timeout: float) -> dict:
    """This script with `--worker SPEC` in a fresh interpreter; its stderr goes to ours, its last JSON line back."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec['kind']} {spec.get('size')} failed (rc={proc.returncode}): see stderr above")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------------
# Generation through the CLI
# ----------------------------------------------------------------------------------------------------------------


def cli_generate(path: str, prompts_file: Path, out_dir: Path, max_new_tokens: int, args, timeout: float) -> dict:
    import datasets

    cmd = [
        sys.executable,
        "-m",
        "trl_qrpo",
        "generate",
        "--dataset_name",
        str(prompts_file),
        "--model_name_or_path",
        path,
        "--num_generations",
        str(args.num_generations),
        "--max_new_tokens",
        str(max_new_tokens),
        "--output_dir",
        str(out_dir),
        "--backend",
        "transformers",
        "--dtype",
        args.dtype,
        "--batch_size",
        str(args.gen_batch_size),
        "--seed",
        "0",
    ]
    env = dict(os.environ, TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )
    counts = datasets.load_from_disk(str(out_dir))["ref_num_tokens"]
    tokens = sum(sum(row) for row in counts)
    return {
        "max_new_tokens": max_new_tokens,
        "wall_s": wall,
        "tokens": tokens,
        "sequences": sum(len(row) for row in counts),
        "tokens_per_s_end_to_end": tokens / wall,
    }


def generation_stage(size: str, path: str, args, timeout: float) -> dict:
    from bench_generation import make_prompts

    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.jsonl"
        with open(prompts_file, "w") as f:
            for prompt in make_prompts(args.gen_prompts, args.gen_prompt_words):
                f.write(json.dumps({"prompt": prompt}) + "\n")
        short_tokens = max(1, args.max_new_tokens // 8)
        short = cli_generate(path, prompts_file, Path(tmp) / "short", short_tokens, args, timeout)
        left = max(1.0, timeout - short["wall_s"])
        full = cli_generate(path, prompts_file, Path(tmp) / "full", args.max_new_tokens, args, left)
    extra_s, extra_tokens = full["wall_s"] - short["wall_s"], full["tokens"] - short["tokens"]
    decode = extra_tokens / extra_s if extra_s > 0 and extra_tokens > 0 else None
    return {
        "size": size,
        "runs": [short, full],
        "tokens_per_s_end_to_end": full["tokens_per_s_end_to_end"],
        "tokens_per_s_decode": decode,
        "decode_note": None if decode else "full run not slower than the short one: decode rate not resolved",
    }


# ----------------------------------------------------------------------------------------------------------------
# Environment, output
# ----------------------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def environment(device: str) -> dict:
    """Versions, where trl_qrpo comes from, the GPU, and the carried wheels' requirements that the image misses."""
    import importlib.metadata as md

    import torch

    import trl_qrpo

    env = common.machine_info()
    env["trl_qrpo_file"] = trl_qrpo.__file__
    for name in ("pyarrow", "fsspec", "huggingface_hub", "tokenizers", "dill", "multiprocess"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    if device == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            env["nvidia_smi"] = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            env["nvidia_smi"] = f"not available: {error}"
    env["unmet_requirements"] = unmet_requirements(("trl", "datasets", "trl-qrpo"))
    return env


def unmet_requirements(dists) -> dict[str, list[str]]:
    """Requires-Dist entries (no extras) of `dists` that the installed packages do not satisfy."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    out = {}
    for dist in dists:
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:
            out[dist] = ["(not installed as a distribution)"]
            continue
        unmet = []
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                installed = md.version(req.name)
            except md.PackageNotFoundError:
                unmet.append(f"{line} (missing)")
                continue
            if req.specifier and not req.specifier.contains(installed, prereleases=True):
                unmet.append(f"{line} (installed {installed})")
        out[dist] = unmet
    return out


def summarize(payload: dict) -> dict:
    """Per size: the ratios and checks against the targets (None where a stage did not run)."""
    out = {}
    for size in payload["args"]["sizes"].split(","):
        steps = payload["steps"].get(size, {})
        mem = payload["memory"].get(size, {})
        gen = payload["generation"].get(size, {})
        checks = steps.get("checks", {})
        ratio = steps.get("ratios", {}).get("qrpo/dpo", {}).get("median_of_ratios")
        mem_ratio = mem.get("peak_ratio")
        zero = checks.get("step0_logratio", {}).get("exactly_zero")
        err = checks.get("logprob_error_nats", {}).get("from_bf16_logits", {}).get("max")
        out[size] = {
            "step_ratio": ratio,
            "step_ratio_met": None if ratio is None else ratio <= TARGETS["step_ratio"],
            "memory_ratio": mem_ratio,
            "memory_measure": mem.get("dpo", {}).get("measure"),
            "memory_ratio_met": None if mem_ratio is None else mem_ratio <= TARGETS["memory_ratio"],
            "step0_logratio_exactly_zero": zero,
            "step0_logratio_max_abs": checks.get("step0_logratio", {}).get("max_abs"),
            "logprob_error_nats": err,
            "logprob_error_met": None if err is None else err < TARGETS["logprob_error_nats"],
            "fp64_head_error_nats": checks.get("logprob_error_nats", {}).get("fp64_head", {}).get("max"),
            "fp64_forward_error_nats": checks.get("logprob_error_nats", {}).get("fp64_forward", {}).get("max"),
            "tokens_per_s": {n: steps["step"][n]["tokens_per_s"] for n in VARIANTS} if "step" in steps else None,
            "generation_tokens_per_s_decode": gen.get("tokens_per_s_decode"),
            "generation_tokens_per_s_end_to_end": gen.get("tokens_per_s_end_to_end"),
        }
    return out


def markdown(payload: dict) -> str:
    env, args = payload["environment"], payload["args"]
    lines = [
        f"# QRPO vs DPO on {env.get('gpu') or 'CPU (smoke)'}" + (" - smoke run" if args["smoke"] else ""),
        "",
        f"_{env.get('gpu') or env.get('cpu')}; torch {env.get('torch')} (CUDA {env.get('cuda')}), transformers "
        f"{env.get('transformers')}, trl {env.get('trl')}, datasets {env.get('datasets')}, accelerate "
        f"{env.get('accelerate')}, Python {env.get('python')}; weights and autocast {args['dtype']}, gradient "
        f"checkpointing {args['gradient_checkpointing']}, {args['batch_pairs']} pairs = "
        f"{2 * args['batch_pairs']} sequences per step; {payload['wall_s']:.0f} s in all._",
        "",
        "| size | params | variant | step s, median (IQR) | time / DPO | tokens/s | peak MiB | step MiB "
        "| peak / DPO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, steps in payload["steps"].items():
        if "step" not in steps:
            continue
        mem = payload["memory"].get(size, {})
        params = payload["models"][size]["parameters"]
        for name in VARIANTS:
            s = steps["step"][name]
            ratio = steps["ratios"]["qrpo/dpo"] if name == "qrpo" else None
            m = mem.get(name, {})
            lines.append(
                f"| {size} | {params / 1e6:.0f}M | {name} | {s['median']:.4g} ({s['p25']:.4g}-{s['p75']:.4g}) | "
                f"{'1' if ratio is None else format(ratio['median_of_ratios'], '.4f')} | "
                f"{common.fmt(s['tokens_per_s'])} | {common.fmt(m.get('peak_over_start_mb'))} | "
                f"{common.fmt(m.get('step_peak_mb'))} | "
                f"{'1' if name == 'dpo' and m else common.fmt(mem.get('peak_ratio'), 4) if m else '-'} |"
            )
    lines += [
        "",
        "| size | step-0 log-ratio | log-prob error vs fp64 (nats, max): from bf16 logits | LM head in fp64 "
        "| whole forward in fp64 |",
        "|---|---|---|---|---|",
    ]
    for size, steps in payload["steps"].items():
        c = steps.get("checks")
        if not c:
            continue
        e = c["logprob_error_nats"]
        zero = c["step0_logratio"]
        zero_text = "exactly 0" if zero["exactly_zero"] else "max |x| {:.3g}".format(zero["max_abs"])
        forward = "{:.3g}".format(e["fp64_forward"]["max"]) if "fp64_forward" in e else "-"
        lines.append(
            f"| {size} | {zero_text} | {e['from_bf16_logits']['max']:.3g} | {e['fp64_head']['max']:.3g} | {forward} |"
        )
    lines += [
        "",
        "| size | generation: decode tokens/s | end-to-end tokens/s | sequences x new tokens |",
        "|---|---|---|---|",
    ]
    for size, gen in payload["generation"].items():
        if "runs" not in gen:
            continue
        full = gen["runs"][-1]
        lines.append(
            f"| {size} | {common.fmt(gen['tokens_per_s_decode'])} | {common.fmt(gen['tokens_per_s_end_to_end'])} | "
            f"{full['sequences']} x {full['max_new_tokens']} |"
        )
    lines += ["", "| size | target | measured | met? |", "|---|---|---|---|"]
    for size, t in payload["summary"].items():
        for label, key, met, bound in (
            ("QRPO/DPO step time", "step_ratio", "step_ratio_met", f"<= {TARGETS['step_ratio']}"),
            ("QRPO/DPO peak memory", "memory_ratio", "memory_ratio_met", f"<= {TARGETS['memory_ratio']:.2f}"),
            (
                "step-0 log-ratio",
                "step0_logratio_max_abs",
                "step0_logratio_exactly_zero",
                "exactly 0",
            ),
            ("log-prob error vs fp64", "logprob_error_nats", "logprob_error_met", "< 1e-3 nats"),
        ):
            value = t.get(key)
            verdict = {True: "yes", False: "NO", None: "not measured"}[t.get(met)]
            lines.append(f"| {size} | {label} {bound} | {common.fmt(value, 4)} | {verdict} |")
    problems = [f"{stage} {size}: {err}" for stage, size, err in payload["errors"]] + [
        f"{stage} {size}: skipped ({why})" for stage, size, why in payload["skipped"]
    ]
    if problems:
        lines += ["", "Not measured:", *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def write(payload: dict, out_dir: Path, name: str) -> None:
    payload["summary"] = summarize(payload)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(payload))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.5b,1.5b", help=f"comma-separated: {','.join(SIZES)}")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated: {','.join(STAGES)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights and autocast")
    p.add_argument("--batch-pairs", type=int, default=8, help="B pairs per step = 2B sequences for both trainers")
    p.add_argument("--prompt-words", type=int, default=96)
    p.add_argument("--completion-words", type=int, default=192, help="completions have between half and all of these")
    p.add_argument("--num-batches", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on", help="on: TRL's default")
    p.add_argument("--steps", type=int, default=16, help="timed rounds (each: one step of each trainer)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--mem-steps", type=int, default=2, help="training steps under the memory measurement")
    p.add_argument("--no-fp64-forward", action="store_true", help="skip the whole-model fp64 forward check")
    p.add_argument("--gen-prompts", type=int, default=16)
    p.add_argument("--gen-prompt-words", type=int, default=48)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--gen-batch-size", type=int, default=64, help="sequences per generate call")
    p.add_argument("--time-budget-s", type=float, default=420, help="skip stages that would end later (0: no limit)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, a couple of steps: for the test suite")
    p.add_argument("--out-dir", default=None, help="default: $OUT when set, else benchmarks/results/gpu")
    p.add_argument("--name", default=None, help="file name stem (default: h200, or smoke with --smoke)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(  # smallest settings; flags given explicitly still win
            sizes="tiny",
            batch_pairs=2,
            prompt_words=6,
            completion_words=10,
            num_batches=2,
            steps=2,
            warmup=1,
            mem_steps=1,
            gen_prompts=2,
            gen_prompt_words=6,
            num_generations=2,
            max_new_tokens=16,
            gen_batch_size=4,
            time_budget_s=0,
        )
        args = p.parse_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:  # no CUDA call at all in smoke mode, in this process or its workers, even on a GPU machine
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.worker is not None:
        spec = json.loads(args.worker)
        worker = {"steps": steps_worker, "memory": memory_worker}[spec["kind"]]
        print(json.dumps(worker(spec), default=str), flush=True)
        return 0

    t0 = time.perf_counter()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for size in sizes:
        if size not in SIZES:
            raise SystemExit(f"Unknown size {size!r}: choose from {sorted(SIZES)}.")
    for stage in stages:
        if stage not in STAGES:
            raise SystemExit(f"Unknown stage {stage!r}: choose from {STAGES}.")
    name = args.name or ("smoke" if args.smoke else "h200")
    out_dir = Path(args.out_dir or os.environ.get("OUT") or BENCH_DIR / "results" / "gpu")

    import torch

    if args.smoke:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        raise SystemExit("No CUDA GPU visible: run on the GPU machine, or pass --smoke for the CPU smoke mode.")
    opts = {
        "device": device,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "steps": args.steps,
        "mem_steps": args.mem_steps,
        "fp64_forward": not args.no_fp64_forward,
    }
    payload = {
        "benchmark": "gpu_qrpo_vs_dpo",
        "args": vars(args),
        "targets": TARGETS,
        "environment": environment(device),
        "models": {},
        "steps": {},
        "memory": {},
        "generation": {},
        "errors": [],
        "skipped": [],
        "wall_s": 0.0,
    }
    log(f"environment: {json.dumps(payload['environment'], default=str)}")
    failed = False
    with tempfile.TemporaryDirectory(prefix="trl_qrpo_gpu_bench_") as scratch:
        payload["models"] = build_models(sizes, Path(scratch), device, args.dtype)
        write(payload, out_dir, name)
        for stage in stages:
            for size in sizes:
                elapsed = time.perf_counter() - t0
                left = args.time_budget_s - elapsed if args.time_budget_s else 3600.0
                if args.time_budget_s and left < STAGE_COST_S[stage] * SIZE_FACTOR[size]:
                    payload["skipped"].append((stage, size, f"time budget: {left:.0f}s left of {args.time_budget_s}"))
                    log(f"skipping {stage} {size}: {left:.0f}s left")
                    continue
                log(f"== {stage} {size}")
                path = payload["models"][size]["path"]
                spec = {"size": size, "path": path, "opts": opts, "work": vars(args)}
                try:
                    if stage == "steps" and args.smoke:  # in this process: one interpreter start less for the test
                        result = steps_worker(dict(spec, kind="steps"))
                        payload["steps"][size] = json.loads(json.dumps(result, default=str))
                    elif stage == "steps":
                        payload["steps"][size] = run_worker(dict(spec, kind="steps"), timeout=left)
                    elif stage == "memory":
                        mem = {}
                        for variant in VARIANTS:
                            mem[variant] = run_worker(dict(spec, kind="memory", variant=variant), timeout=left)
                        mem["peak_ratio"] = mem["qrpo"]["peak_over_start_mb"] / mem["dpo"]["peak_over_start_mb"]
                        mem["step_peak_ratio"] = mem["qrpo"]["step_peak_mb"] / mem["dpo"]["step_peak_mb"]
                        payload["memory"][size] = mem
                    else:
                        payload["generation"][size] = generation_stage(size, path, args, timeout=left)
                except Exception as error:  # record it, carry on with the other stages
                    failed = True
                    payload["errors"].append((stage, size, f"{type(error).__name__}: {error}"))
                    log(f"{stage} {size} failed:\n{traceback.format_exc()}")
                payload["wall_s"] = time.perf_counter() - t0
                write(payload, out_dir, name)
    payload["wall_s"] = time.perf_counter() - t0
    write(payload, out_dir, name)
    print(markdown(payload), flush=True)
    print(f"wrote {out_dir / (name + '.json')} and {name}.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
