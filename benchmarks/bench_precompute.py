"""Training step with and without `precompute_ref_log_probs`, QRPO and DPO (issue item 2).

    python benchmarks/bench_precompute.py                 # defaults: --sizes tiny,60m, a few minutes
    python benchmarks/bench_precompute.py --sizes 60m --steps 20
    python benchmarks/bench_precompute.py --device cuda --dtype bfloat16 --sizes 0.5b --out-dir OUT   # a GPU

Variants (same weights, same pairs, same batches, as in bench_train_step.py):
  qrpo / dpo           reference log-probs from a reference model on the fly (a second forward every step)
  qrpo_pre / dpo_pre   reference log-probs computed once in __init__ and read from the batch; no reference model
                       is kept in memory

Reported: training_step median time (variants alternating in one process), the one-off precompute pass (seconds,
and per sequence), and peak memory in a fresh subprocess per variant (over the process start: models included, so
the reference model the precompute path frees shows here; RSS on the CPU, the CUDA allocator's peak on a GPU). Takes
the options of bench_train_step.py (--device, --dtype, --out-dir, ...). Writes <out-dir>/precompute.json and .png.
"""

from __future__ import annotations

import functools
import time

import bench_train_step as bts
import common
import train_common as tc

VARIANTS = [
    tc.Variant("qrpo", "qrpo", "paired", precompute=False),
    tc.Variant("qrpo_pre", "qrpo", "paired", precompute=True),
    tc.Variant("dpo", "dpo", "paired", precompute=False),
    tc.Variant("dpo_pre", "dpo", "paired", precompute=True),
    tc.Variant("qrpo_stored", "qrpo", "paired", stored=True),
]
RATIOS = (
    ("qrpo_pre", "qrpo"),
    ("dpo_pre", "dpo"),
    ("qrpo_pre", "dpo_pre"),
    ("qrpo", "dpo"),
    (
        "qrpo_stored",
        "dpo",
    ),  # target <= 0.8 (floor 0.75: one forward+backward instead of those plus a reference forward)
    ("qrpo_stored", "dpo_pre"),
)

PRECOMPUTE_S: dict[str, float] = {}


def _time_precompute():
    """Wrap both trainers' _precompute_ref_logps to record their duration (benchmark instrumentation only)."""
    from trl import DPOTrainer

    from trl_qrpo import QRPOTrainer

    for cls, name in ((QRPOTrainer, "qrpo_pre"), (DPOTrainer, "dpo_pre")):
        original = cls.__dict__["_precompute_ref_logps"]

        @functools.wraps(original)
        def timed(self, *a, _original=original, _name=name, **k):
            start = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                PRECOMPUTE_S[_name] = time.perf_counter() - start

        setattr(cls, "_precompute_ref_logps", timed)


COLUMNS = [
    ("size", "size"),
    ("variant", "variant"),
    ("step_s", "step s (median)"),
    ("vs_on_the_fly", "time / on the fly"),
    ("tok_s", "tokens/s"),
    ("precompute_s", "precompute pass s"),
    ("precompute_ms_seq", "precompute ms/seq"),
    ("peak_mb", "peak MiB (over start)"),
    ("step_mb", "step MiB (over setup)"),
    ("mem_vs", "peak / on the fly"),
]


def main(argv=None):
    args = bts.parse_args(argv)
    if args.name == "train_step":
        args.name = "precompute"
    _time_precompute()

    def run_size(size):
        PRECOMPUTE_S.clear()
        tc.REF_LOGPS_S.clear()
        r = bts.run_size(size, args, VARIANTS, RATIOS)
        sequences = 2 * args.batch_pairs * tc.Workload(size=size).num_batches
        r["precompute_s"] = dict(PRECOMPUTE_S)
        r["ref_logps_s"] = dict(tc.REF_LOGPS_S)
        if "qrpo_stored" in r["ref_logps_s"] and "dpo_pre" in r["precompute_s"]:
            # `ref-logps` rows/s against TRL's precompute pass rows/s (target >= 1): the pass times of the same rows
            r["ref_logps_vs_trl_precompute"] = r["precompute_s"]["dpo_pre"] / r["ref_logps_s"]["qrpo_stored"]
        r["precompute_s_per_sequence"] = {k: v / sequences for k, v in PRECOMPUTE_S.items()}
        return r

    machine, results, load = common.run_sizes(args.sizes, run_size)
    rows = []
    for r in results:
        for name, s in r["step"].items():
            mem = r.get("memory", {}).get(name, {})
            base = name.replace("_pre", "")
            ratio = r["ratios"].get(f"{name}/{base}", {}) if name.endswith("_pre") else {}
            rows.append(
                {
                    "size": r["size"],
                    "variant": name,
                    "step_s": s["median"],
                    "vs_on_the_fly": ratio.get("median_of_ratios"),
                    "tok_s": s["tokens_per_s"],
                    "precompute_s": r["precompute_s"].get(name),
                    "precompute_ms_seq": (r["precompute_s_per_sequence"].get(name) or 0) * 1000 or None,
                    "peak_mb": mem.get("peak_over_start_mb"),
                    "step_mb": mem.get("peak_over_setup_mb"),
                    "mem_vs": ratio.get("peak_over_start_ratio"),
                }
            )
    common.print_table(rows, COLUMNS, title="precompute_ref_log_probs: on the fly vs precomputed")
    bts.print_checks(results)
    for r in results:
        q = r["ratios"]
        print(
            f"{r['size']}: QRPO precomputed/on-the-fly step time {q['qrpo_pre/qrpo']['median_of_ratios']:.3f}, "
            f"DPO {q['dpo_pre/dpo']['median_of_ratios']:.3f}; QRPO/DPO both precomputed "
            f"{q['qrpo_pre/dpo_pre']['median_of_ratios']:.3f}; stored reference log-probs / DPO's default (live "
            f"reference) {q['qrpo_stored/dpo']['median_of_ratios']:.3f} (target <= 0.8), / DPO precomputed "
            f"{q['qrpo_stored/dpo_pre']['median_of_ratios']:.3f}; `ref-logps` speed / TRL's precompute pass "
            f"{r.get('ref_logps_vs_trl_precompute', float('nan')):.2f} (target >= 1)",
            flush=True,
        )

    def draw(plt):
        names = [v.name for v in VARIANTS]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [k + i * width for k in range(len(results))]
            axes[0].bar(xs, [r["step"][name]["median"] for r in results], width, label=name)
            if all("memory" in r for r in results):
                axes[1].bar(xs, [r["memory"][name]["peak_over_start_mb"] for r in results], width, label=name)
        for ax, title in zip(axes, ["training_step median (s)", "peak memory over start (MiB)"]):
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(results))], [r["size"] for r in results])
            ax.set_title(title)
            ax.set_yscale("log")
        axes[0].legend()
        fig.suptitle(f"Reference log-probs on the fly vs precomputed ({args.device}, {args.dtype})")

    return common.save("precompute", args, machine, load, draw, results=results, table=rows)


if __name__ == "__main__":
    main()
