"""Print the measured tables of benchmarks/results/*.json as markdown (the tables in benchmarks/README.md).

python benchmarks/report.py [--results-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bench_generation
import bench_precompute
import bench_targets
import common


def machine_line(payload: dict) -> str:
    m, load = payload["machine"], payload.get("load", {})
    return (
        f"_{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gib']} GiB, "
        f"{'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'}; torch {m['torch']}, transformers {m['transformers']}, "
        f"trl {m['trl']}; 1-min load during the run {load.get('load1_min', 0):.2f}-{load.get('load1_max', 0):.2f} "
        f"(median {load.get('load1_median', 0):.2f})._"
    )


def train_step(payload: dict) -> None:
    print(f"\n### Training step: QRPO vs DPO (gradient checkpointing {payload['gradient_checkpointing']})\n")
    print(machine_line(payload))
    rows = []
    for r in payload["results"]:
        w = r["workload"]
        for name, s in r["step"].items():
            ratio = r["ratios"].get(f"{name}/dpo", {})
            mem = r.get("memory", {}).get(name, {})
            e2e = r.get("end_to_end", {}).get(name, {})
            rows.append(
                {
                    "size": f"{r['size']} ({r['parameters'] / 1e6:.0f}M)",
                    "variant": name,
                    "batch": f"{2 * w['batch_pairs']} seq, {s['tokens_per_step']:.0f} tok",
                    "step": f"{s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f})",
                    "ratio": f"{ratio['median_of_ratios']:.3f}" if ratio else "1",
                    "tok_s": s["tokens_per_s"],
                    "e2e": e2e.get("median"),
                    "e2e_ratio": f"{ratio['end_to_end_ratio_of_medians']:.3f}"
                    if ratio.get("end_to_end_ratio_of_medians")
                    else ("1" if not ratio else "-"),
                    "peak": mem.get("peak_over_start_mb"),
                    "step_mb": mem.get("peak_over_setup_mb"),
                    "mem_ratio": f"{ratio['peak_over_start_ratio']:.3f}"
                    if ratio.get("peak_over_start_ratio")
                    else ("1" if not ratio else "-"),
                }
            )
    common.print_table(
        rows,
        [
            ("size", "model"),
            ("variant", "variant"),
            ("batch", "batch"),
            ("step", "step s, median (IQR)"),
            ("ratio", "time / DPO"),
            ("tok_s", "tokens/s"),
            ("e2e", "train() s/step"),
            ("e2e_ratio", "train() / DPO"),
            ("peak", "peak MiB"),
            ("step_mb", "step MiB"),
            ("mem_ratio", "peak / DPO"),
        ],
    )


def precompute(payload: dict) -> None:
    print("\n### precompute_ref_log_probs: on the fly vs precomputed\n")
    print(machine_line(payload))
    common.print_table(payload["table"], bench_precompute.COLUMNS)


def targets(payload: dict) -> None:
    print("\n### Target preparation\n")
    print(machine_line(payload))
    common.print_table(payload["table"], bench_targets.MATH_COLUMNS)
    if payload.get("dataset"):
        print()
        common.print_table(bench_targets.dataset_rows(payload["dataset"]), bench_targets.DATASET_COLUMNS)


def generation(payload: dict) -> None:
    a = payload["args"]
    print(
        f"\n### Reference generation ({a['device']}): {a['prompts']} prompts x {a['num_generations']}, "
        f"max_new_tokens {a['max_new_tokens']}, batch {a['batch_size']}\n"
    )
    print(machine_line(payload))
    common.print_table(payload["table"], bench_generation.COLUMNS)


SECTIONS = {"train_step": train_step, "precompute": precompute, "targets": targets, "generation": generation}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    args = p.parse_args(argv)
    for name, section in SECTIONS.items():
        path = Path(args.results_dir) / f"{name}.json"
        if path.exists():
            section(json.loads(path.read_text()))


if __name__ == "__main__":
    main()
