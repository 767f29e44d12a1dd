"""QRPOTrainer against TRL's DPOTrainer: one training step on the same model, data and batch (issue item 1).

    python benchmarks/bench_train_step.py                      # defaults: --sizes tiny,60m, a few minutes
    python benchmarks/bench_train_step.py --sizes tiny,20m,60m --steps 20 --gradient-checkpointing off
    python benchmarks/bench_train_step.py --device cuda --dtype bfloat16 --sizes 0.5b,1.5b --out-dir OUT   # a GPU

Variants, built on the same saved weights and the same synthetic pairs (token sequences checked equal):
  dpo        TRL DPOTrainer, B pairs per step = 2B sequences (sigmoid loss, reference model on the fly)
  qrpo       QRPOTrainer on the paired data, sample_selector="both": B rows = the same 2B sequences
  qrpo_pw    QRPOTrainer on the same completions as pointwise rows, 2B rows per step (same sequences again)

Checked first, before any update: QRPO's step-0 log-ratios (exactly 0) and its sequence log-probs against a float64
forward of the same weights. Measured: `training_step` (forward, reference forward, loss, backward) on prepared
batches, the three taking turns step by step in one process (who goes first rotates; CUDA synchronised around each
step); `trainer.train()` end to end (loader, optimizer, logging); peak memory of a few steps in a fresh subprocess
per variant (RSS on the CPU, the CUDA allocator's peak on a GPU). Writes <out-dir>/train_step.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from dataclasses import asdict

import common
import train_common as tc

VARIANTS = [
    tc.Variant("dpo", "dpo", "paired"),
    tc.Variant("qrpo", "qrpo", "paired"),
    tc.Variant("qrpo_pw", "qrpo", "pointwise"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,60m", help=f"comma-separated: {','.join(common.SIZES)},{common.SMOLLM2}")
    p.add_argument("--batch-pairs", type=int, default=4, help="B: pairs per DPO step (2B sequences for every variant)")
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--completion-words", type=int, default=32, help="completions have between half and all of these")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--e2e-steps", type=int, default=4, help="optimizer steps per trainer.train() call (0: skip)")
    p.add_argument("--e2e-rounds", type=int, default=2)
    p.add_argument("--mem-steps", type=int, default=2, help="training steps in each memory subprocess (0: skip)")
    p.add_argument("--mem-repeats", type=int, default=1)
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on", help="on: TRL's default")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models train")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and autocast (bf16 as train())"
    )
    p.add_argument("--smoke", action="store_true", help="smallest settings (seconds): for the smoke test")
    p.add_argument("--out-dir", default=None, help="where to write JSON/PNG (default: benchmarks/results)")
    p.add_argument("--name", default="train_step")
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(  # smallest settings; flags given explicitly still win
            sizes="tiny",
            batch_pairs=1,
            prompt_words=4,
            completion_words=8,
            steps=2,
            warmup=1,
            e2e_steps=2,
            e2e_rounds=1,
            mem_steps=1,
        )
        args = p.parse_args(argv)
    return args


def run_size(size: str, args, variants=VARIANTS, ratio_pairs=(("qrpo", "dpo"), ("qrpo_pw", "dpo"))) -> dict:
    work = tc.Workload(
        size=size,
        batch_pairs=args.batch_pairs,
        prompt_words=args.prompt_words,
        completion_words=args.completion_words,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        device=args.device,
        dtype=args.dtype,
    )
    path = tc.model_path(work)
    pairs = tc.make_pairs(work)
    result = {"size": size, "parameters": common.num_parameters(path), "workload": asdict(work)}
    print(f"\n== {size}: {result['parameters'] / 1e6:.1f}M parameters, {work.batch_pairs} pairs per step", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        trainers, batches, init_s = {}, {}, {}
        for v in variants:
            trainers[v.name], init_s[v.name] = common.wall(
                tc.build_trainer, v, work, pairs, f"{tmp}/{v.name}", max(1, args.e2e_steps)
            )
            batches[v.name] = tc.prepared_batches(trainers[v.name], work.num_batches)
            tc.prepare_for_steps(trainers[v.name])
        tc.check_same_sequences(batches)
        result["init_s"] = init_s
        qrpo = next(v.name for v in variants if v.trainer == "qrpo")
        result["checks"] = tc.logprob_checks(trainers[qrpo], batches[qrpo][0], path)

        times = tc.alternate(trainers, batches, args.warmup, args.steps)
        result["step"] = tc.step_stats(times, batches, args.steps)
        result["ratios"] = {f"{a}/{b}": tc.paired_ratio(times, a, b) for a, b in ratio_pairs}
        if args.e2e_steps > 1:
            result["end_to_end"] = tc.end_to_end(trainers, args.e2e_rounds, args.e2e_steps)
            for a, b in ratio_pairs:
                ea, eb = result["end_to_end"][a]["median"], result["end_to_end"][b]["median"]
                result["ratios"][f"{a}/{b}"]["end_to_end_ratio_of_medians"] = ea / eb if ea and eb else None
        del trainers, batches
        gc.collect()

    if args.mem_steps > 0:
        result["memory"] = tc.measure_memory(variants, work, args.mem_steps, args.mem_repeats)
        for a, b in ratio_pairs:
            ma, mb = result["memory"][a], result["memory"][b]
            result["ratios"][f"{a}/{b}"]["peak_over_start_ratio"] = ma["peak_over_start_mb"] / mb["peak_over_start_mb"]
            result["ratios"][f"{a}/{b}"]["peak_over_setup_ratio"] = ma["peak_over_setup_mb"] / mb["peak_over_setup_mb"]
    return result


def table_rows(results: list[dict], baseline: str = "dpo") -> list[dict]:
    rows = []
    for r in results:
        for name, s in r["step"].items():
            mem = r.get("memory", {}).get(name, {})
            e2e = r.get("end_to_end", {}).get(name, {})
            ratio = r["ratios"].get(f"{name}/{baseline}", {})
            rows.append(
                {
                    "size": r["size"],
                    "params_m": r["parameters"] / 1e6,
                    "variant": name,
                    "step_s": s["median"],
                    "iqr": f"{s['p25']:.3g}-{s['p75']:.3g}" if s["p25"] is not None else None,
                    "ratio": ratio.get("median_of_ratios"),
                    "tok_s": s["tokens_per_s"],
                    "ctok_s": s["completion_tokens_per_s"],
                    "e2e_s": e2e.get("median"),
                    "e2e_ratio": ratio.get("end_to_end_ratio_of_medians"),
                    "peak_mb": mem.get("peak_over_start_mb"),
                    "step_mb": mem.get("peak_over_setup_mb"),
                    "mem_ratio": ratio.get("peak_over_start_ratio"),
                    "step_mem_ratio": ratio.get("peak_over_setup_ratio"),
                }
            )
    return rows


COLUMNS = [
    ("size", "size"),
    ("params_m", "params (M)"),
    ("variant", "variant"),
    ("step_s", "step s (median)"),
    ("iqr", "IQR s"),
    ("ratio", "time / DPO"),
    ("tok_s", "tokens/s"),
    ("ctok_s", "completion tok/s"),
    ("e2e_s", "train() s/step"),
    ("e2e_ratio", "train() / DPO"),
    ("peak_mb", "peak MiB (over start)"),
    ("step_mb", "step MiB (over setup)"),
    ("mem_ratio", "peak / DPO"),
    ("step_mem_ratio", "step mem / DPO"),
]


def draw(results, rows, device, dtype, baseline="dpo"):
    def _draw(plt):
        names = list(results[0]["step"])
        sizes = [r["size"] for r in results]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [k + i * width for k in range(len(sizes))]
            axes[0].bar(xs, [r["step"][name]["median"] for r in results], width, label=name)
            axes[1].bar(xs, [r["step"][name]["tokens_per_s"] for r in results], width, label=name)
            if all("memory" in r for r in results):
                axes[2].bar(xs, [r["memory"][name]["peak_over_start_mb"] for r in results], width, label=name)
        for ax, title in zip(axes, ["training_step median (s)", "tokens / s", "peak memory over start (MiB)"]):
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sizes))], sizes)
            ax.set_title(title)
            ax.set_yscale("log")
        axes[0].legend()
        for k, r in enumerate(results):
            ratio = r["ratios"].get(f"qrpo/{baseline}", {}).get("median_of_ratios")
            if ratio:
                axes[0].annotate(f"QRPO/DPO {ratio:.3f}", (k, r["step"][baseline]["median"]), fontsize=8)
        fig.suptitle(f"QRPOTrainer vs DPOTrainer, same model, data and batch ({device}, {dtype})")

    return _draw


def print_checks(results: list[dict]) -> None:
    for r in results:
        zero, error = r["checks"]["step0_logratio"], r["checks"]["logprob_error_vs_fp64"]
        logratio = "exactly 0" if zero["exactly_zero"] else f"max |x| {zero['max_abs']:.3g}"
        print(
            f"{r['size']}: step-0 log-ratio {logratio} over {zero['sequences']} sequences; "
            "QRPO sequence log-probs vs a float64 forward: max error "
            f"{error['max']:.3g} nats",
            flush=True,
        )


def main(argv=None):
    args = parse_args(argv)
    machine, results, load = common.run_sizes(args.sizes, lambda size: run_size(size, args))
    rows = table_rows(results)
    common.print_table(rows, COLUMNS, title="QRPO vs DPO, one training step (forward, reference forward, backward)")
    print_checks(results)
    verdicts = []
    for r in results:
        ratio = r["ratios"]["qrpo/dpo"]
        verdict = {
            "size": r["size"],
            "time_ratio": ratio["median_of_ratios"],
            "time_target_met": ratio["median_of_ratios"] <= 1.03,
            "peak_ratio": ratio.get("peak_over_start_ratio"),
            "peak_target_met": None if "peak_over_start_ratio" not in ratio else ratio["peak_over_start_ratio"] <= 1.0,
        }
        verdicts.append(verdict)
        print(
            f"{r['size']}: QRPO/DPO step time {verdict['time_ratio']:.3f} (target <= 1.03: "
            f"{'met' if verdict['time_target_met'] else 'NOT met'})"
            + (
                ""
                if verdict["peak_ratio"] is None
                else f", peak memory {verdict['peak_ratio']:.3f} (target <= 1.00: "
                f"{'met' if verdict['peak_target_met'] else 'NOT met'})"
            ),
            flush=True,
        )
    return common.save(
        "train_step",
        args,
        machine,
        load,
        draw(results, rows, args.device, args.dtype),
        gradient_checkpointing=args.gradient_checkpointing,
        results=results,
        table=rows,
        targets=verdicts,
    )


if __name__ == "__main__":
    main()
