"""Target preparation: quantiles, targets and log Z for a large dataset (issue item 3).

    python benchmarks/bench_targets.py                                 # 1,000,000 rows x 64 refs; ~1-2 minutes
    python benchmarks/bench_targets.py --rows 1000000 --refs 64 --dataset-rows 1000000 --ragged-rows 100000

Two layers, so that both the math and the plumbing are visible:
  math       trl_qrpo.losses.quantile_rewards + qrpo_targets on torch tensors ([rows] rewards, [rows, refs] float32
             reference rewards), a fresh subprocess per case: median time over --repeats and peak RSS over the
             inputs (peak reset right before the call; tracemalloc would not see torch's allocations).
  dataset    the steps QRPOTrainer._prepare_dataset runs for them, with the trainer's arguments: the reference check
             (trl_qrpo.data.check_references, one pass over the whole matrix), map_quantiles and map_targets (Arrow
             batches of 10,000 in and out) on a paired `datasets.Dataset` of --dataset-rows rows (float64 rewards);
             peak RSS over the start of the steps, against the float64 reference matrix; again on --ragged-rows rows
             whose lists differ in length (NaN-padded path); and the whole _prepare_dataset (tokenization included)
             on --full-rows rows.
Targets: math under 2 s for 1,000,000 x 64 on this 2-core machine; the datasets path under 3 s for the same, peak
within 2x the reference matrix. Writes results/targets.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import common

MATH_CASES = {
    # name: (completions per row k, transform, partition mode, ties)
    "pointwise identity": (1, "identity", "continuous", "le"),
    "paired (k=2) identity": (2, "identity", "continuous", "le"),
    "pointwise log + discrete Z": (1, "log", "discrete", "le"),
    "pointwise ties=random": (1, "identity", "continuous", "random"),
}


def math_worker(spec: dict) -> dict:
    import torch

    from trl_qrpo.losses import qrpo_targets, quantile_rewards

    k, transform, partition, ties = MATH_CASES[spec["case"]]
    rows, refs = spec["rows"], spec["refs"]
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(rows, refs, generator=g, dtype=torch.float32)
    rewards = torch.randn(rows, k, generator=g, dtype=torch.float32)
    if k == 1:
        rewards = rewards[:, 0].contiguous()
    # warm the code paths on a small slice (first-call costs are not what is measured)
    q, n, _ = quantile_rewards(rewards[:100], ref[:100], ties=ties, generator=g)
    qrpo_targets(q, transform, 1e-3, n, partition)
    gc.collect()
    base = common.rss_mb()
    t_q, t_t, peaks = [], [], []
    for _ in range(spec["repeats"]):
        common.reset_peak_rss()
        start = time.perf_counter()
        q, n, _ = quantile_rewards(rewards, ref, ties=ties, generator=g)
        mid = time.perf_counter()
        targets, beta_log_z = qrpo_targets(q, transform, 1e-3, n, partition)
        end = time.perf_counter()
        peaks.append(common.peak_rss_mb() - base)
        t_q.append(mid - start)
        t_t.append(end - mid)
        del q, n, targets, beta_log_z
        gc.collect()
    return {
        "case": spec["case"],
        "rows": rows,
        "refs": refs,
        "completions_per_row": k,
        "input_mb": (ref.numel() * ref.element_size() + rewards.numel() * rewards.element_size()) / 2**20,
        "quantiles_s": statistics.median(t_q),
        "targets_s": statistics.median(t_t),
        "total_s": statistics.median([a + b for a, b in zip(t_q, t_t)]),
        "all_total_s": [a + b for a, b in zip(t_q, t_t)],
        "peak_over_inputs_mb": max(peaks),
        "threads": torch.get_num_threads(),
    }


def paired_dataset(rows: int, refs: int, seed: int = 0, ragged: bool = False):
    """Paired rows built column-wise in Arrow (float64 rewards, as Python floats would be stored).

    ``ragged``: every other row has one reference reward fewer (lists of different lengths, NaN-padded path).
    """
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    words = np.array(common.word_list()[:5000], dtype=object)
    pick = rng.integers(0, len(words), size=(rows, 3))
    values = rng.normal(0, 1, (rows, refs))
    if ragged:
        lengths = np.where(np.arange(rows) % 2 == 0, refs, refs - 1)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = values[np.arange(refs)[None, :] < lengths[:, None]]
        ref_rewards = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)).cast(pa.list_(pa.float64()))
    else:
        ref_rewards = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), refs).cast(pa.list_(pa.float64()))
    table = pa.table(
        {
            "prompt": pa.array(words[pick[:, 0]].tolist()),
            "chosen": pa.array([" " + w for w in words[pick[:, 1]]]),
            "rejected": pa.array([" " + w for w in words[pick[:, 2]]]),
            "chosen_reward": rng.normal(0.5, 1, rows),
            "rejected_reward": rng.normal(-0.5, 1, rows),
            "ref_rewards": ref_rewards,
        }
    )
    return Dataset(table)


def dataset_worker(spec: dict) -> dict:
    """The quantile and target steps of QRPOTrainer._prepare_dataset (trl_qrpo.data.map_quantiles / map_targets,
    with the trainer's arguments), timed one by one; then the whole _prepare_dataset on a smaller set."""
    import tempfile

    import numpy as np

    from trl_qrpo import QRPOConfig, QRPOTrainer, get_transform
    from trl_qrpo.data import (
        QuantileOptions,
        TargetOptions,
        check_references,
        detect_layout,
        map_quantiles,
        map_targets,
    )

    out = {"rows": spec["rows"], "refs": spec["refs"], "ragged": spec.get("ragged", False)}
    from datasets import load_from_disk

    # Saved and loaded back memory-mapped, as `load_dataset` / `load_from_disk` give it: the start RSS holds no copy
    # of the data, so the peak over it counts reading the reference matrix itself (1x) plus the working memory.
    data_dir = tempfile.mkdtemp()
    paired_dataset(spec["rows"], spec["refs"], ragged=out["ragged"]).save_to_disk(data_dir)
    gc.collect()
    ds = load_from_disk(data_dir)
    out["ref_matrix_mb"] = spec["rows"] * spec["refs"] * 8 / 2**20  # float64, as stored
    with tempfile.TemporaryDirectory() as tmp:
        cfg = QRPOConfig(output_dir=tmp, bf16=False, use_cpu=True, report_to="none")
    layout = detect_layout(ds.column_names)
    transform = get_transform(cfg.transform, **(cfg.transform_kwargs or {}))
    gc.collect()
    base = common.rss_mb()
    common.reset_peak_rss()
    import warnings

    start, cpu_start = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ragged case warns (by design)
        check_references(ds.select_columns(["ref_rewards"]).with_format("arrow")[:], cfg.num_ref_rewards)
    checked = time.perf_counter()
    # The trainer's default path (identity transform, beta not length-normalised): targets in the quantile pass.
    targeted = map_quantiles(
        ds,
        layout,
        QuantileOptions.from_args(cfg),
        warn=False,
        targets=TargetOptions.from_args(cfg, transform),
    )
    end, cpu_end = time.perf_counter(), time.process_time()
    out.update(
        cpu_s=cpu_end - cpu_start,  # this process's CPU time: what the wall time would be on idle cores
        check_s=checked - start,
        quantile_map_s=end - checked,
        maps_total_s=end - start,
        maps_peak_over_start_mb=common.peak_rss_mb() - base,
        rows_per_s=spec["rows"] / (end - start),
    )
    # The separate target pass, as run with normalize_beta_by_length or a per-prompt transform (after tokenization).
    del targeted
    gc.collect()
    quantiled = map_quantiles(
        ds,
        layout,
        QuantileOptions.from_args(cfg),
        warn=False,
    )
    mid = time.perf_counter()
    targeted = map_targets(quantiled, TargetOptions.from_args(cfg, transform))
    out["target_map_s"] = time.perf_counter() - mid
    assert len(targeted) == spec["rows"]
    assert np.isfinite(np.asarray(targeted.with_format("arrow")["target"].combine_chunks().flatten())).all()

    # The whole _prepare_dataset (tokenization, truncation check, targets) on a smaller set, through a bare trainer
    # object carrying only what the method reads (no model is loaded).
    if spec.get("full_rows"):
        small = paired_dataset(spec["full_rows"], spec["refs"], seed=1)
        stub = QRPOTrainer.__new__(QRPOTrainer)
        tokenizer = common.build_tokenizer()
        stub._tokenizer, stub._transform, stub._fitted_transform = tokenizer, transform, None
        stub._rows_prepared = set()
        try:
            start = time.perf_counter()
            QRPOTrainer._prepare_dataset(stub, small, tokenizer, cfg, "train")
            out["full_prepare_rows"] = spec["full_rows"]
            out["full_prepare_s"] = time.perf_counter() - start
            out["full_prepare_rows_per_s"] = spec["full_rows"] / out["full_prepare_s"]
        except Exception as error:  # an internal changed shape: report, don't fail the benchmark
            out["full_prepare_error"] = repr(error)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--refs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(MATH_CASES), help="comma-separated: " + ", ".join(MATH_CASES))
    p.add_argument("--dataset-rows", type=int, default=1_000_000, help="rows for the datasets steps (0: skip)")
    p.add_argument("--ragged-rows", type=int, default=100_000, help="rows for the ragged datasets steps (0: skip)")
    p.add_argument("--full-rows", type=int, default=10_000, help="rows for the whole _prepare_dataset (0: skip)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--name", default="targets")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(  # smallest settings; flags given explicitly still win
            rows=20_000,
            refs=16,
            repeats=1,
            cases="pointwise identity",
            dataset_rows=2_000,
            ragged_rows=1_000,
            full_rows=200,
        )
        args = p.parse_args(argv)
    return args


MATH_COLUMNS = [
    ("case", "case"),
    ("shape", "rows x refs"),
    ("quantiles_s", "quantile_rewards s"),
    ("targets_s", "qrpo_targets s"),
    ("total_s", "total s"),
    ("peak_mb", "peak MiB over inputs"),
    ("input_mb", "inputs MiB"),
    ("met", "< 2 s"),
]
DATASET_COLUMNS = [
    ("step", "datasets path"),
    ("rows", "rows"),
    ("s", "seconds"),
    ("cpu_s", "CPU s"),
    ("rows_s", "rows/s"),
    ("peak_mb", "peak MiB over start"),
    ("matrix_mb", "ref matrix MiB"),
    ("met", "< 3 s, peak < 2x"),
]


def dataset_rows(d: dict) -> list[dict]:
    """The datasets-path result as table rows (each map, both, and the whole _prepare_dataset when measured)."""
    label = " (ragged lists)" if d.get("ragged") else ""
    rows = [
        {"step": "check_references" + label, "rows": d["rows"], "s": d["check_s"]},
        {"step": "map_quantiles, targets in the same pass" + label, "rows": d["rows"], "s": d["quantile_map_s"]},
        {
            "step": "both: the trainer's quantiles and targets" + label,
            "rows": d["rows"],
            "s": d["maps_total_s"],
            "cpu_s": d.get("cpu_s"),
            "peak_mb": d["maps_peak_over_start_mb"],
            "matrix_mb": d["ref_matrix_mb"],
            "met": None
            if d.get("ragged")
            else (
                "yes" if d["maps_total_s"] < 3.0 and d["maps_peak_over_start_mb"] < 2 * d["ref_matrix_mb"] else "NO"
            ),
        },
    ]
    rows.append(
        {
            "step": "(map_targets as a separate pass: normalize_beta_by_length, per-prompt transforms)" + label,
            "rows": d["rows"],
            "s": d["target_map_s"],
        }
    )
    if "full_prepare_s" in d:
        rows.append(
            {
                "step": "whole _prepare_dataset (tokenization included)",
                "rows": d["full_prepare_rows"],
                "s": d["full_prepare_s"],
            }
        )
    for row in rows:
        row["rows_s"] = row["rows"] / row["s"]
    return rows


def main(argv=None):
    args = parse_args(argv)
    machine = common.machine_info()
    script = Path(__file__)
    math_results = []
    with common.LoadMonitor() as load:
        for case in args.cases.split(","):
            spec = {
                "kind": "math",
                "case": case.strip(),
                "rows": args.rows,
                "refs": args.refs,
                "repeats": args.repeats,
            }
            math_results.append(common.run_worker(script, spec))
        dataset_result = ragged_result = None
        if args.dataset_rows:
            spec = {"kind": "dataset", "rows": args.dataset_rows, "refs": args.refs, "full_rows": args.full_rows}
            dataset_result = common.run_worker(script, spec)
        if args.ragged_rows:
            spec = {"kind": "dataset", "rows": args.ragged_rows, "refs": args.refs, "ragged": True}
            ragged_result = common.run_worker(script, spec)
    rows = [
        {
            "case": r["case"],
            "shape": f"{r['rows']:,} x {r['refs']}"
            + (f" (k={r['completions_per_row']})" if r["completions_per_row"] > 1 else ""),
            "quantiles_s": r["quantiles_s"],
            "targets_s": r["targets_s"],
            "total_s": r["total_s"],
            "peak_mb": r["peak_over_inputs_mb"],
            "input_mb": r["input_mb"],
            "met": "yes" if r["total_s"] < 2.0 else "NO",
        }
        for r in math_results
    ]
    common.print_table(rows, MATH_COLUMNS, title="Target preparation, the math (torch tensors)")
    if dataset_result or ragged_result:
        common.print_table(
            [row for d in (dataset_result, ragged_result) if d for row in dataset_rows(d)],
            DATASET_COLUMNS,
            title=f"Target preparation through datasets (paired rows, {args.refs} reference rewards)",
        )

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        names = [r["case"] for r in math_results]
        axes[0].barh(names, [r["quantiles_s"] for r in math_results], label="quantile_rewards")
        axes[0].barh(
            names,
            [r["targets_s"] for r in math_results],
            left=[r["quantiles_s"] for r in math_results],
            label="qrpo_targets",
        )
        axes[0].axvline(2.0, color="red", linestyle="--", label="target 2 s")
        axes[0].set_xlabel(f"seconds for {args.rows:,} x {args.refs}")
        axes[0].legend()
        axes[1].barh(names, [r["peak_over_inputs_mb"] for r in math_results])
        axes[1].set_xlabel("peak RSS over inputs (MiB)")
        fig.suptitle("QRPO target preparation (CPU)")

    return common.save(
        "targets",
        args,
        machine,
        load.summary(),
        draw,
        math=math_results,
        dataset=dataset_result,
        dataset_ragged=ragged_result,
        table=rows,
        target_met=all(r["total_s"] < 2.0 for r in math_results),
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        print(json.dumps(math_worker(spec) if spec["kind"] == "math" else dataset_worker(spec)), flush=True)
    else:
        main()
