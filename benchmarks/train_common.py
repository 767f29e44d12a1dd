"""Training-step machinery shared by bench_train_step.py and bench_precompute.py.

A *variant* is one trainer set-up: TRL's DPOTrainer or QRPOTrainer, paired or pointwise data, reference log-probs
computed on the fly or precomputed. Every variant of a run is built on the same model folder (same weights), the same
synthetic pairs (same tokenized sequences, checked), the same batch of sequences and the same config otherwise.

Three measurements:
- `alternate`: `trainer.training_step(model, batch)` (forward, reference forward, loss, backward: where the trainers
  differ) on prepared batches, the variants taking turns step by step in one process, rotating who goes first.
- `end_to_end`: `trainer.train()` (data loading, optimizer, scheduler, logging included), variants in turn, per-step
  wall time from a callback.
- `memory`: one fresh subprocess per variant (`python train_common.py --worker SPEC`): memory before the model is
  loaded, after the trainer is built, and the peak over a few training steps (peak reset right before them). On the
  CPU the resident set size (VmHWM); on CUDA `torch.cuda.max_memory_allocated`.
- `logprob_checks`: before any update (policy == reference), QRPO's step-0 log-ratios (exactly 0 expected) and its
  sequence log-probs against an independent float64 forward of the same weights.

`Workload.device` / `Workload.dtype` choose the device (`cpu`, `cuda`) and the weights' dtype (`float32`,
`bfloat16`: bf16 weights and bf16 autocast, as `train()` sets them up); CUDA is synchronised around every timed step.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common


@dataclass(frozen=True)
class Variant:
    name: str
    trainer: str  # "dpo" or "qrpo"
    layout: str = "paired"  # "paired" or "pointwise" (QRPO only)
    precompute: bool = False
    stored: bool = False  # QRPO only: the rows carry reference log-probs (`trl qrpo ref-logps`), no reference model


# Seconds `compute_ref_logps` (the `ref-logps` step) took per variant: its throughput against TRL's precompute pass.
REF_LOGPS_S: dict[str, float] = {}


@dataclass
class Workload:
    size: str
    batch_pairs: int = 4  # B pairs = 2B sequences per step, for every variant
    prompt_words: int = 16
    completion_words: int = 32
    num_batches: int = 4  # distinct batches, cycled
    gradient_checkpointing: bool = True  # TRL's default
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float32"  # weights (policy and reference) and autocast: "float32" or "bfloat16"


def model_path(work: Workload) -> str:
    return str(common.model_dir(work.size, dtype=work.dtype, device=work.device))


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so that a wall time covers it."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def make_pairs(work: Workload) -> list[dict]:
    return common.synthetic_pairs(
        work.batch_pairs * work.num_batches, work.prompt_words, work.completion_words, seed=work.seed
    )


def build_trainer(variant: Variant, work: Workload, pairs: list[dict], output_dir: str, max_steps: int = 5):
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from trl_qrpo import QRPOConfig, QRPOTrainer

    path = model_path(work)
    tokenizer = AutoTokenizer.from_pretrained(path)
    per_step = work.batch_pairs if variant.layout == "paired" else 2 * work.batch_pairs
    kwargs = dict(
        output_dir=output_dir,
        bf16=work.dtype == "bfloat16",
        use_cpu=work.device == "cpu",
        model_init_kwargs={"dtype": work.dtype},  # the policy and the reference both load in this dtype
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-6,
        per_device_train_batch_size=per_step,
        per_device_eval_batch_size=per_step,
        precompute_ref_batch_size=per_step,
        gradient_checkpointing=work.gradient_checkpointing,
        train_sampling_strategy="sequential",  # the same batches, in the same order, for every variant
        dataloader_num_workers=0,
        precompute_ref_log_probs=variant.precompute,
        max_steps=max_steps,
        seed=work.seed,
    )
    if variant.trainer == "dpo":
        if variant.layout != "paired":
            raise ValueError("DPO needs paired data.")
        trainer = DPOTrainer(
            model=path, args=DPOConfig(**kwargs), train_dataset=Dataset.from_list(pairs), processing_class=tokenizer
        )
    else:
        rows = pairs if variant.layout == "paired" else common.pointwise_blocks(pairs, work.batch_pairs)
        dataset = Dataset.from_list(rows)
        if variant.stored:  # what `trl qrpo ref-logps` writes, computed here in the same process, timed
            import time

            from trl_qrpo.precompute import RefLogpsConfig, compute_ref_logps

            import torch
            from transformers import AutoModelForCausalLM

            reference = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, work.dtype))
            options = RefLogpsConfig(device=work.device, logprob_batch_size=2 * per_step)
            start = time.perf_counter()  # the pass itself, as TRL's precompute pass is timed (model loaded)
            dataset = compute_ref_logps(dataset, options, model=reference, processing_class=tokenizer)
            synchronize(work.device)
            REF_LOGPS_S[variant.name] = time.perf_counter() - start
            del reference
        trainer = QRPOTrainer(
            model=path,
            args=QRPOConfig(**kwargs, beta=1e-3),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log dict
    return trainer


def prepare_for_steps(trainer) -> None:
    """What Trainer.train() does to the model before its loop; needed when driving training_step directly.

    `accelerator.prepare_model` (one process) moves the model and, in bf16, wraps its forward in the mixed-precision
    autocast; then activation checkpointing and train mode."""
    trainer.model = trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
    args = trainer.args
    if args.activation_checkpointing:
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop


def prepared_batches(trainer, n: int) -> list[dict]:
    """The first n collated batches of the prepared training set, in order (no shuffling, no loader in the timing)."""
    loader = trainer.get_eval_dataloader(trainer.train_dataset)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def check_same_sequences(batches: dict[str, list[dict]]) -> None:
    """Every variant must train on exactly the same token sequences, batch by batch."""
    import torch

    names = list(batches)
    ref = batches[names[0]]
    for name in names[1:]:
        for i, (a, b) in enumerate(zip(ref, batches[name], strict=True)):
            for key in ("input_ids", "attention_mask", "completion_mask"):
                if not torch.equal(a[key], b[key]):
                    raise AssertionError(f"batch {i}: {key} of {name} differs from {names[0]}'s")


def batch_tokens(batch) -> tuple[int, int, int]:
    """(sequences, tokens incl. padding-free prompt, completion tokens) of a collated batch."""
    return (
        int(batch["input_ids"].shape[0]),
        int(batch["attention_mask"].sum()),
        int(batch["completion_mask"].sum()),
    )


def alternate(trainers: dict, batches: dict[str, list[dict]], warmup: int, steps: int) -> dict[str, list[float]]:
    """training_step times (s) per variant, the variants taking turns every step (rotating the first)."""
    names = list(trainers)
    times = {name: [] for name in names}
    device = next(iter(trainers.values())).args.device.type
    for step in range(warmup + steps):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            trainer = trainers[name]
            batch = batches[name][step % len(batches[name])]
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            trainer.training_step(trainer.model, batch)
            synchronize(device)
            elapsed = time.perf_counter() - start
            trainer.model.zero_grad(set_to_none=True)
            if step >= warmup:
                times[name].append(elapsed)
    return times


def step_stats(times: dict[str, list[float]], batches: dict[str, list[dict]], steps: int) -> dict[str, dict]:
    """Median step time, quartiles, tokens/s (all tokens and completion tokens) and sequences/s per variant."""
    out = {}
    for name, ts in times.items():
        counted = [batches[name][s % len(batches[name])] for s in range(len(ts))]
        seqs = sum(batch_tokens(b)[0] for b in counted) / len(counted)
        toks = sum(batch_tokens(b)[1] for b in counted) / len(counted)
        comp = sum(batch_tokens(b)[2] for b in counted) / len(counted)
        stats = common.summarize(ts)
        # Per-variant throughput from the total time over the same batches (robust to odd/even batch mixes).
        total = sum(ts)
        stats.update(
            sequences_per_step=seqs,
            tokens_per_step=toks,
            completion_tokens_per_step=comp,
            tokens_per_s=toks * len(ts) / total,
            completion_tokens_per_s=comp * len(ts) / total,
            sequences_per_s=seqs * len(ts) / total,
            times=ts,
        )
        out[name] = stats
    return out


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> dict:
    """Median over rounds of time[num]/time[den] (each round runs both on the same batch), and the ratio of medians."""
    import statistics

    ratios = [a / b for a, b in zip(times[num], times[den], strict=True)]
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "median_of_ratios": statistics.median(ratios),
        "p25": q[0],
        "p75": q[2],
        "ratio_of_medians": statistics.median(times[num]) / statistics.median(times[den]),
        "ratio_of_totals": sum(times[num]) / sum(times[den]),
    }


class StepTimer:
    """A TrainerCallback recording the wall time between consecutive optimizer steps of trainer.train()."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.durations, self._last = [], None

            def on_train_begin(self, args, state, control, **kwargs):
                self._last, self._first = time.perf_counter(), True

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if not self._first:  # the first step builds the optimizer and lazy buffers
                    self.durations.append(now - self._last)
                self._first, self._last = False, now

        return _Timer()


def end_to_end(trainers: dict, rounds: int, steps: int) -> dict[str, dict]:
    """trainer.train() for `steps` optimizer steps, variants in turn, `rounds` times; median step wall time."""
    timers = {}
    for name, trainer in trainers.items():
        timers[name] = StepTimer()
        trainer.add_callback(timers[name])
        trainer.args.max_steps = steps
    runtimes = {name: [] for name in trainers}
    for r in range(rounds):
        names = list(trainers)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            gc.collect()
            start = time.perf_counter()
            trainers[name].train()
            runtimes[name].append(time.perf_counter() - start)
    out = {}
    for name in trainers:
        stats = common.summarize(timers[name].durations)
        stats["train_call_s"] = runtimes[name]
        out[name] = stats
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checks at step 0
# ----------------------------------------------------------------------------------------------------------------


def logprob_checks(trainer, batch, path: str) -> dict:
    """Before any update (policy == reference), on one batch: QRPO's sequence log-ratios (exactly 0 expected: the
    same weights, the same kernels) and its sequence log-probs (the loss's inputs) against a float64 forward of the
    same saved weights (every bf16 or fp32 value is exact in fp64): the error, in nats per sequence, of the whole
    log-prob computation in the run's dtype. Reported, not asserted: in bf16 it is dominated by the forward's own
    rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    inputs = trainer._prepare_inputs(batch)
    logps, ref_logps, _ = trainer.sequence_log_probs(trainer.model, inputs)
    logps, logratio = logps.detach().double(), (logps - ref_logps).detach()
    input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
    model64 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).to(input_ids.device).eval()
    with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
        logits = model64(input_ids=input_ids, attention_mask=inputs["attention_mask"], use_cache=False).logits
        token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None])[..., 0]
        reference = (token_logps * completion_mask[:, 1:]).sum(dim=1)
    error = (logps - reference).abs()
    del model64, logits, token_logps
    gc.collect()
    return {
        "step0_logratio": {
            "max_abs": float(logratio.abs().max()),
            "exactly_zero": bool(torch.all(logratio == 0)),
            "sequences": int(logratio.numel()),
        },
        "logprob_error_vs_fp64": {
            "max": float(error.max()),
            "mean": float(error.mean()),
            "per_sequence": error.tolist(),
        },
        "completion_tokens_per_sequence": completion_mask[:, 1:].sum(dim=1).tolist(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Memory: one fresh process per variant
# ----------------------------------------------------------------------------------------------------------------


class MemoryProbe:
    """This process's memory, MiB: the CUDA allocator's on `cuda`, else the resident set size (VmRSS / VmHWM)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.measure = "torch.cuda.max_memory_allocated" if self.cuda else "RSS (VmHWM)"

    def current(self) -> float:
        if not self.cuda:
            return common.rss_mb()
        import torch

        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20

    def peak(self) -> float:
        if not self.cuda:
            return common.peak_rss_mb()
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20

    def reset_peak(self) -> bool:
        """Reset the peak to the current figure; False where that is not possible (old Linux kernels)."""
        if not self.cuda:
            return common.reset_peak_rss()
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True


def memory_worker(spec: dict) -> dict:
    import torch  # imports first, so that every variant's baseline holds the same libraries
    import trl  # noqa: F401

    import trl_qrpo  # noqa: F401

    variant, work, steps = Variant(**spec["variant"]), Workload(**spec["work"]), spec["steps"]
    if work.device == "cuda":
        torch.cuda.init()
    probe = MemoryProbe(work.device)
    pairs = make_pairs(work)
    gc.collect()
    start_mb = probe.current()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer = build_trainer(variant, work, pairs, tmp)
        init_s = time.perf_counter() - start
        setup_peak = probe.peak()
        batches = prepared_batches(trainer, work.num_batches)
        prepare_for_steps(trainer)
        gc.collect()
        setup_mb = probe.current()
        exact = probe.reset_peak()
        for step in range(steps):
            trainer.training_step(trainer.model, batches[step % len(batches)])
            trainer.model.zero_grad(set_to_none=True)
        peak = probe.peak()
    return {
        "variant": variant.name,
        "measure": probe.measure,
        "start_mb": start_mb,
        "after_setup_mb": setup_mb,
        "setup_peak_mb": setup_peak - start_mb,
        "peak_mb": peak,
        "peak_over_start_mb": peak - start_mb,  # models + reference + gradients + activations of the steps
        "peak_over_setup_mb": peak - setup_mb,  # what the steps add: gradients, activations, temporaries
        "init_s": init_s,
        "peak_reset_exact": exact,
    }


def measure_memory(variants: list[Variant], work: Workload, steps: int, repeats: int = 1) -> dict[str, dict]:
    """Fresh subprocess per variant (and per repeat, variants interleaved); the minimum over repeats of each figure."""
    results = {v.name: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            spec = {"variant": asdict(variant), "work": asdict(work), "steps": steps}
            results[variant.name].append(common.run_worker(Path(__file__), spec))
    out = {}
    for name, runs in results.items():
        merged = {k: min(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
        merged["measure"] = runs[0]["measure"]
        merged["runs"] = runs
        out[name] = merged
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(memory_worker(json.loads(sys.argv[2]))), flush=True)
    else:
        raise SystemExit("internal worker: python train_common.py --worker SPEC_JSON")
