"""Tables (JSON, CSV) and PNG plots from the finished runs of experiments/run.py.

    python experiments/run.py --config experiments/config.yaml --report_only

Reads `work_dir/eval/reference-s*/result.json` and `work_dir/runs/*/result.json`, writes to `results_dir`:
results.json (everything), main.csv (method x beta, mean, std and standard error over seeds), sweep_transforms.csv,
sweep_num_ref_rewards.csv, reward_vs_kl.png, length_vs_reward.png, qrpo_sweeps.png, examples.md (for the groups
main ... baseline_beta); with the `frontier` / `pointwise` groups (the --frontier profile): frontier.png (reward and
length of fresh samples against KL, one curve per method over its betas, bars = standard error over seeds), frontier.csv,
frontier_table.md; with the `residuals` group (the --residuals profile): residuals_table.md, residuals.csv and
residuals.png (experiments/residuals.py); with the `powered` group (the --powered profile): powered_table.md,
powered.csv, powered.png (matched-KL differences with paired bootstrap intervals, experiments/powered.py).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import yaml
from config import METHODS, ExperimentConfig, portable
from powered import length_controlled_rewards, matched_kl_bootstrap, matched_kl_grid, standard_error
from residuals import residual_rows, residuals_markdown, residuals_plot

from trl_qrpo.precompute.io import write_json

LABELS = {"qrpo": "QRPO", "dpo": "DPO", "simpo": "SimPO", "rebel": "REBEL", "reference": "pi_ref"}
COLORS = {"qrpo": "tab:red", "dpo": "tab:blue", "simpo": "tab:green", "rebel": "tab:purple", "reference": "black"}
FRONTIER_GROUPS = ("frontier", "pointwise")


# frontier curves: (method, training data) -> label, color, line style
CURVES = {
    ("qrpo", "pairs"): ("QRPO (best/worst pairs)", "tab:red", "-"),
    ("qrpo", "pointwise"): ("QRPO pointwise (all samples)", "tab:orange", "--"),
    ("dpo", "pairs"): ("DPO (best/worst pairs)", "tab:blue", "-"),
    ("simpo", "pairs"): ("SimPO (best/worst pairs)", "tab:green", "-"),
    ("rebel", "pairs"): ("REBEL (best/worst pairs)", "tab:purple", "-"),
}
METRICS = (
    "reward",
    "kl",
    "length",
    "length_bias_own_samples",
    "length_bias_reference_samples",
    "truncated_fraction",
    "positive_fraction",
    "negative_fraction",
    "reward_length_spearman",
)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _data(run: dict) -> str:
    """The training data of a run: "pairs" (every run before the pointwise group) or "pointwise"."""
    return run.get("data") or "pairs"


def _stat(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return mean, std


def aggregate(results: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Group runs by `keys` and give the mean, std and standard error (over seeds) of every metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    rows = []
    for key, runs in groups.items():
        row = dict(zip(keys, key))
        row["seeds"] = sorted(r["seed"] for r in runs)
        row["num_seeds"] = len(runs)
        row["samples_per_seed"] = runs[0]["eval"]["num_samples"]
        for metric in METRICS:
            mean, std = _stat([r["eval"].get(metric) for r in runs])
            row[metric], row[f"{metric}_std"] = mean, std
            # the standard error of the mean over seeds: what the tables' "±" and the plots' bars show
            row[f"{metric}_se"] = None if std is None else std / math.sqrt(len(runs))
        if len(runs) == 1:  # one seed: the per-sample standard errors instead
            row["reward_stderr"] = runs[0]["eval"].get("reward_stderr")
            row["kl_stderr"] = runs[0]["eval"].get("kl_stderr")
        row["train_seconds"] = _stat([r.get("train_seconds") for r in runs])[0]
        row["eval_seconds"] = _stat([r.get("eval_seconds") for r in runs])[0]
        row["train_steps"] = runs[0].get("train", {}).get("steps")
        row["sequences_per_step"] = runs[0].get("train", {}).get("sequences_per_step")
        rows.append(row)
    return rows


def _fmt(mean, std, digits=3, signed=False):
    if mean is None:
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})


def markdown_table(main_rows: list[dict], reference: dict | None) -> str:
    header = (
        "Mean ± standard error over the seeds of each row (no ± with one seed).\n\n"
        "| method | beta | seeds | reward | KL(pi‖pi_ref) | length (tokens) | length bias rho, own samples | "
        "length bias rho, pi_ref samples |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    if reference:
        lines.append(
            f"| pi_ref | – | {reference['num_seeds']} "
            f"| {_fmt(reference['reward'], reference['reward_se'], signed=True)} "
            f"| 0 | {_fmt(reference['length'], reference['length_se'], 1)} | – | – |"
        )
    for r in main_rows:
        lines.append(
            f"| {LABELS[r['method']]} | {r['beta']:g} | {r['num_seeds']} "
            f"| {_fmt(r['reward'], r['reward_se'], signed=True)} "
            f"| {_fmt(r['kl'], r['kl_se'], 2)} | {_fmt(r['length'], r['length_se'], 1)} "
            f"| {_fmt(r['length_bias_own_samples'], r['length_bias_own_samples_se'], 2, True)} "
            f"| {_fmt(r['length_bias_reference_samples'], r['length_bias_reference_samples_se'], 2, True)} |"
        )
    return header + "\n".join(lines) + "\n"


def build_report(cfg: ExperimentConfig, work: Path, results_dir: Path) -> dict:
    results_dir.mkdir(parents=True, exist_ok=True)
    ref_runs = [_load(p) for p in sorted((work / "eval").glob("reference-s*/result.json"))]
    all_runs = [_load(p) for p in sorted((work / "runs").glob("*/result.json"))]
    # the method comparison and QRPO sweeps: pairs only, not the residual study's runs (other learning rates)
    runs = [r for r in all_runs if _data(r) == "pairs" and "residuals" not in r.get("groups", [])]
    main_betas = {m: cfg.betas(m)[0] for m in METHODS}
    qrpo_default = cfg.methods_qrpo_transform
    n_max = cfg.references_num_ref_rewards

    reference = None
    if ref_runs:
        reference = aggregate([dict(r, method="reference") for r in ref_runs], ("method",))[0]
    # Method comparison: every beta of every method (QRPO: default transform, all references)
    comparable = [
        r for r in runs if r["method"] != "qrpo" or (r["transform"] == qrpo_default and r["num_ref_rewards"] == n_max)
    ]
    order = {m: i for i, m in enumerate(("qrpo", "dpo", "simpo", "rebel"))}
    main_rows = sorted(
        aggregate(comparable, ("method", "beta")),
        key=lambda r: (order[r["method"]], r["beta"] != main_betas[r["method"]], r["beta"]),
    )
    qrpo = [r for r in runs if r["method"] == "qrpo"]
    transform_rows = sorted(
        aggregate([r for r in qrpo if r["num_ref_rewards"] == n_max], ("transform", "beta")),
        key=lambda r: (r["transform"], -r["beta"]),
    )
    n_rows = sorted(
        aggregate(
            [r for r in qrpo if r["transform"] == qrpo_default and r["beta"] == main_betas["qrpo"]],
            ("num_ref_rewards",),
        ),
        key=lambda r: r["num_ref_rewards"],
    )
    # the n sweep compares runs of the sweep seeds only, so that every n has the same seeds
    sweep_seeds = set(cfg.sweep_num_ref_rewards_seeds)
    n_rows_matched = sorted(
        aggregate(
            [
                r
                for r in qrpo
                if r["transform"] == qrpo_default and r["beta"] == main_betas["qrpo"] and r["seed"] in sweep_seeds
            ],
            ("num_ref_rewards",),
        ),
        key=lambda r: r["num_ref_rewards"],
    )
    data_stats = _load(work / "data_stats.json") if (work / "data_stats.json").exists() else None
    timing = _load(work / "timing.json") if (work / "timing.json").exists() else None

    groups = cfg.groups
    classic = [g for g in groups if g not in FRONTIER_GROUPS and g not in ("residuals", "lr_select", "powered")]
    if classic:
        write_csv(results_dir / "main.csv", ([dict(reference, beta=None)] if reference else []) + main_rows)
        write_csv(results_dir / "sweep_transforms.csv", transform_rows)
        write_csv(results_dir / "sweep_num_ref_rewards.csv", n_rows_matched)
    frontier_rows = None
    if any(g in FRONTIER_GROUPS for g in groups):
        frontier_rows = frontier_table(cfg, all_runs)
        write_csv(results_dir / "frontier.csv", ([dict(reference, beta=None)] if reference else []) + frontier_rows)
        kl_grid = cfg.frontier_sweep_kl_grid
        (results_dir / "frontier_table.md").write_text(
            frontier_markdown(frontier_rows, reference, kl_grid, _load_if(work / "pointwise_stats.json"))
        )
        _frontier_plot(results_dir / "frontier.png", frontier_rows, reference)
    residual_table = None
    if "residuals" in groups:
        order = list(cfg.residuals_runs or {})  # the configuration's order
        residual_table = sorted(
            residual_rows(all_runs), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order)
        )
        write_csv(results_dir / "residuals.csv", residual_table)
        (results_dir / "residuals_table.md").write_text(residuals_markdown(residual_table, reference))
        residuals_plot(results_dir / "residuals.png", all_runs, residual_table)
    powered_summary = None
    if "powered" in groups and list((work / "runs").glob("powered-*/samples.jsonl")):
        powered_summary = powered_report(cfg, work, results_dir)
    if frontier_rows is not None or residual_table is not None or powered_summary is not None:
        (results_dir / "config.yaml").write_text(
            "# The exact configuration of these results (profile and flags applied), written by report.py;\n"
            "# it runs again with: python experiments/run.py --config <this file>\n"
            + yaml.safe_dump(portable(cfg), sort_keys=False)
        )
    summary = {
        "config": portable(cfg),
        "data": data_stats,
        "timing_seconds": timing,
        "reference": reference,
        "methods": main_rows,
        "qrpo_transforms": transform_rows,
        "qrpo_num_ref_rewards": n_rows_matched,
        "qrpo_num_ref_rewards_all_seeds": n_rows,
        "frontier": frontier_rows,
        "pointwise_data": _load_if(work / "pointwise_stats.json"),
        "residuals": residual_table,
        "powered": powered_summary,
        "runs": [
            {k: v for k, v in r.items() if k != "train"}
            | {
                "train_steps": r["train"]["steps"],
                "train_loss": r["train"]["train_loss"],
                # the rest of the training's summary (rows and sequences per step, ...): enough to rebuild the tables
                "train_info": {k: v for k, v in r["train"].items() if k not in ("steps", "train_loss", "log_history")},
                # every logged step (loss, epoch, target and implicit reward per side, residual): how a run got there
                "train_log": [h for h in r["train"].get("log_history", []) if "loss" in h],
            }
            for r in all_runs
        ],
        "reference_runs": ref_runs,
    }
    write_json(results_dir / "results.json", summary)
    if classic:
        (results_dir / "main_table.md").write_text(markdown_table(main_rows, reference))
        _plots(results_dir, main_rows, reference, transform_rows, n_rows_matched, main_betas, cfg.sweep_transforms)
        _examples(results_dir, work, runs, main_betas, qrpo_default, n_max)
    return summary


def restore_work_dir(results_json: Path, work: Path) -> None:
    """Write into the empty folder `work` the run results a results.json holds (`runs`, `reference_runs`, and the
    data, timing and pointwise statistics), in the layout `build_report` reads, so that the tables and plots of
    committed results can be rebuilt after their runs' folders are gone. Samples are not in results.json: what needs
    them is not rebuilt."""
    summary = _load(results_json)
    if any(work.iterdir()):
        raise SystemExit(f"restore_work_dir: {work} is not empty; it would mix restored and real runs.")
    if not summary.get("runs") and not summary.get("reference_runs"):
        raise SystemExit(f"{results_json}: no 'runs' nor 'reference_runs' to rebuild a report from.")
    if summary.get("powered"):
        raise SystemExit(
            f"{results_json}: the powered comparison needs every run's samples, which results.json does not hold; "
            "rebuild it with --report_only from its work_dir."
        )
    # results.json written before runs kept "train_info": the sequences per step from its aggregated rows
    per_step = {
        (row.get("method"), row.get("data") or "pairs", row.get("beta")): row["sequences_per_step"]
        for rows in summary.values()
        if isinstance(rows, list)
        for row in rows
        if isinstance(row, dict) and row.get("sequences_per_step") is not None
    }
    for run in summary.get("runs") or []:
        result = {k: v for k, v in run.items() if k not in ("train_steps", "train_loss", "train_log", "train_info")}
        info = run.get("train_info") or {}
        if "sequences_per_step" not in info:
            key = (run.get("method"), _data(run), run.get("beta"))
            info = info | ({"sequences_per_step": per_step[key]} if key in per_step else {})
        result["train"] = info | {
            "steps": run["train_steps"],
            "train_loss": run["train_loss"],
            "log_history": run.get("train_log", []),
        }
        (work / "runs" / run["id"]).mkdir(parents=True)
        write_json(work / "runs" / run["id"] / "result.json", result)
    for run in summary.get("reference_runs") or []:
        (work / "eval" / f"reference-s{run['seed']}").mkdir(parents=True)
        write_json(work / "eval" / f"reference-s{run['seed']}" / "result.json", run)
    for key, name in (("data", "data_stats"), ("timing_seconds", "timing"), ("pointwise_data", "pointwise_stats")):
        if summary.get(key) is not None:
            write_json(work / f"{name}.json", summary[key])


def _load_if(path: Path):
    return _load(path) if path.exists() else None


# ----------------------------------------------------------------------------------------------------------------
# Reward-KL frontiers
# ----------------------------------------------------------------------------------------------------------------


def frontier_table(cfg: dict, runs: list[dict]) -> list[dict]:
    """One row per (method, data, beta) of the runs planned in a frontier group (the groups each result.json
    records): mean, std and standard error over seeds, in curve order and, within a curve, from the largest beta (least KL) to the
    smallest."""
    chosen = [dict(r, data=_data(r)) for r in runs if set(r.get("groups", [])) & set(FRONTIER_GROUPS)]
    order = {key: i for i, key in enumerate(CURVES)}
    rows = aggregate(chosen, ("method", "data", "beta"))
    for row in rows:
        row["curve"] = CURVES[(row["method"], row["data"])][0]
    return sorted(rows, key=lambda r: (order[(r["method"], r["data"])], -r["beta"]))


def interpolate_reward(rows: list[dict], kl: float) -> float | None:
    """The curve's mean reward at `kl`, linear between its two measured points (in KL order) that bracket it; None
    outside the measured range. Mean points only: a reading aid, the table's seeds and bars are the evidence."""
    points = sorted((r["kl"], r["reward"]) for r in rows if r["kl"] is not None and r["reward"] is not None)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= kl <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return None


def _curves(rows: list[dict]) -> dict:
    curves: dict[tuple, list[dict]] = {}
    for r in rows:
        curves.setdefault((r["method"], r["data"]), []).append(r)
    return curves


def frontier_markdown(rows: list[dict], reference: dict | None, kl_grid: list[float], pointwise: dict | None) -> str:
    lines = [
        "# Reward-KL frontiers (held-out prompts; mean ± standard error over seeds)\n",
        (
            "| curve | beta | seeds | reward | KL(pi‖pi_ref) (nats) | length (tokens) | truncated | steps | "
            "sequences / step |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if reference:
        lines.append(
            f"| pi_ref | – | {reference['num_seeds']} | {_fmt(reference['reward'], reference['reward_se'], signed=True)}"
            f" | 0 | {_fmt(reference['length'], reference['length_se'], 1)} "
            f"| {_fmt(reference['truncated_fraction'], None, 2)} | – | – |"
        )
    for r in rows:
        lines.append(
            f"| {r['curve']} | {r['beta']:g} | {r['num_seeds']} | {_fmt(r['reward'], r['reward_se'], signed=True)} "
            f"| {_fmt(r['kl'], r['kl_se'], 2)} | {_fmt(r['length'], r['length_se'], 1)} "
            f"| {_fmt(r['truncated_fraction'], None, 2)} | {r['train_steps']} | {r['sequences_per_step']} |"
        )
    if kl_grid:
        lines += [
            "",
            (
                "Reward read off each frontier at fixed KL (linear between the two betas whose mean KLs bracket it; "
                "n/a outside the curve's measured range):"
            ),
            "",
            "| curve | " + " | ".join(f"KL = {k:g}" for k in kl_grid) + " |",
            "|---|" + "---|" * len(kl_grid),
        ]
        for (method, data), curve in _curves(rows).items():
            values = [interpolate_reward(curve, k) for k in kl_grid]
            lines.append(
                f"| {CURVES[(method, data)][0]} | "
                + " | ".join("n/a" if v is None else f"{v:+.3f}" for v in values)
                + " |"
            )
    if pointwise:
        lines += [
            "",
            (
                f"Pointwise QRPO trains on all {pointwise['rows_per_prompt']} samples of each prompt "
                f"({pointwise['num_rows']} rows, mean reward {pointwise['reward_mean']:+.3f}); the pair methods on "
                f"the best and worst of the same samples ({pointwise['fraction_of_rows_in_a_pair']:.0%} of them). "
                "Same optimizer steps and sequences per step (a pair is 2 sequences)."
            ),
        ]
    return "\n".join(lines) + "\n"


def _frontier_plot(path: Path, rows: list[dict], reference: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, ykey, ylabel in (
        (axes[0], "reward", "mean VADER reward of fresh samples"),
        (axes[1], "length", "mean length of fresh samples (tokens)"),
    ):
        if reference:
            _errorbar(
                ax,
                [0.0],
                [reference[ykey]],
                [0],
                [reference.get(f"{ykey}_se") or 0],
                color="black",
                fmt="*",
                markersize=12,
                label="pi_ref",
            )
        for (method, data), curve in _curves(rows).items():
            label, color, style = CURVES[(method, data)]
            curve = [r for r in curve if r["kl"] is not None]
            ax.errorbar(
                [r["kl"] for r in curve],
                [r[ykey] for r in curve],
                xerr=[r["kl_se"] or 0 for r in curve],
                yerr=[r[f"{ykey}_se"] or 0 for r in curve],
                fmt="o" + style,  # points joined in beta order: the frontier is parametrised by beta
                color=color,
                capsize=3,
                markersize=5,
                mfc="white" if data == "pointwise" else color,
                label=label,
            )
            for r in curve:
                ax.annotate(
                    f"{r['beta']:g}", (r["kl"], r[ykey]), textcoords="offset points", xytext=(4, 4), fontsize=6
                )
        ax.set_xlabel("KL(π‖π_ref): mean sequence log-ratio of the policy's own samples (nats)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("Reward against KL, one curve per method over β (labels: β)")
    axes[1].set_title("Length against KL (same runs)")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(
        f"Held-out prompts; points = mean over {seeds_label(r['num_seeds'] for r in rows)} per point, "
        "bars = standard error over seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def seeds_label(counts) -> str:
    """How many seeds a plot's points average, for its title: "4 seeds", or "1-3 seeds" when they differ."""
    counts = sorted({int(c) for c in counts})
    if not counts:
        return "no seeds"
    low, high = counts[0], counts[-1]
    span = f"{low}" if low == high else f"{low}-{high}"
    return f"{span} seed{'s' if high > 1 else ''}"


def _errorbar(ax, x, y, xerr, yerr, **kw):
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=kw.pop("fmt", "o"), capsize=3, **kw)


def _method_points(ax, rows, main_betas, xkey, ykey, with_seeds):
    """One point per method and beta, bars = standard error over seeds; filled circles for each method's main beta."""
    for r in rows:
        main = r["beta"] == main_betas[r["method"]]
        label = f"{LABELS[r['method']]} β={r['beta']:g}"
        if with_seeds:
            label += f" ({seeds_label([r['num_seeds']])})"
        _errorbar(
            ax,
            [r[xkey]],
            [r[ykey]],
            [r[f"{xkey}_se"] or 0],
            [r[f"{ykey}_se"] or 0],
            color=COLORS[r["method"]],
            fmt="o" if main else "s",
            markersize=8 if main else 6,
            mfc=COLORS[r["method"]] if main else "white",
            label=label,
        )


def _plots(results_dir, main_rows, reference, transform_rows, n_rows, main_betas, sweep_transforms):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ref_point(ax, xkey, ykey):
        if reference:
            x = 0.0 if xkey == "kl" else reference[xkey]
            _errorbar(
                ax,
                [x],
                [reference[ykey]],
                [reference.get(f"{xkey}_se") or 0 if xkey != "kl" else 0],
                [reference.get(f"{ykey}_se") or 0],
                color="black",
                fmt="*",
                markersize=12,
                label="pi_ref",
            )

    # 1. reward against KL; 2. length against reward
    for name, xkey, ykey, with_seeds, xlabel, ylabel, title in (
        (
            "reward_vs_kl.png",
            "kl",
            "reward",
            True,
            "KL(π‖π_ref): mean sequence log-ratio of the policy's own samples (nats)",
            "mean VADER reward of fresh samples",
            "Reward against KL (held-out prompts; bars: standard error over seeds)",
        ),
        (
            "length_vs_reward.png",
            "reward",
            "length",
            True,
            "mean VADER reward of fresh samples",
            "mean completion length (tokens)",
            "Length against reward (labels: seeds per point)",
        ),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        ref_point(ax, xkey, ykey)
        _method_points(ax, main_rows, main_betas, xkey, ykey, with_seeds=with_seeds)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(results_dir / name, dpi=130)
        plt.close(fig)

    # 3. QRPO sweeps: transforms x beta (reward against KL), and the number of reference rewards
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    ax = axes[0]
    ref_point(ax, "kl", "reward")
    colors = {"identity": "tab:red", "log": "tab:orange", "normal-icdf": "tab:brown"}
    for r in transform_rows:
        first = r["beta"] == float(sweep_transforms.get(r["transform"], [r["beta"]])[0])
        color = colors.get(r["transform"], "tab:gray")
        _errorbar(
            ax,
            [r["kl"]],
            [r["reward"]],
            [r["kl_se"] or r.get("kl_stderr") or 0],
            [r["reward_se"] or r.get("reward_stderr") or 0],
            color=color,
            fmt="o" if first else "s",
            mfc=color if first else "white",
            label=f"{r['transform']} β={r['beta']:g} ({seeds_label([r['num_seeds']])})",
        )
    ax.set_xlabel("KL(π‖π_ref) (nats)")
    ax.set_ylabel("mean VADER reward")
    ax.set_title("QRPO: transform and β")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    if n_rows:
        ns = [r["num_ref_rewards"] for r in n_rows]
        ax.errorbar(
            ns,
            [r["reward"] for r in n_rows],
            yerr=[r["reward_se"] or r.get("reward_stderr") or 0 for r in n_rows],
            fmt="o-",
            color="tab:red",
            capsize=3,
            label="QRPO reward",
        )
        if reference:
            ax.axhline(reference["reward"], color="black", ls="--", lw=1, label="pi_ref reward")
        ax.set_xscale("log")
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("reference rewards per prompt used for the quantiles (n)")
        ax.set_ylabel("mean VADER reward")
        ax2 = ax.twinx()
        ax2.plot(ns, [r["kl"] for r in n_rows], "s:", color="gray", label="KL")
        ax2.set_ylabel("KL (nats)", color="gray")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="best")
        ax.set_title(
            f"QRPO: number of reference rewards ({n_rows[0].get('transform', 'identity')}; "
            f"{seeds_label(r['num_seeds'] for r in n_rows)} per point)"
        )
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(results_dir / "qrpo_sweeps.png", dpi=130)
    plt.close(fig)


def _examples(results_dir, work, runs, main_betas, qrpo_default, n_max, num_prompts=4):
    """A few completions of each method (main beta, seed 0) next to pi_ref's, for the same prompts; nothing is
    written when no run has its samples (a report rebuilt from results.json keeps the examples it had)."""
    if not (work / "prompts.json").exists():
        return
    prompts = json.loads((work / "prompts.json").read_text())["eval"]
    sources = [("pi_ref", work / "eval" / "reference-s0" / "samples.jsonl")]
    for r in runs:
        if (
            r["seed"] == 0
            and r["beta"] == main_betas[r["method"]]
            and (r["method"] != "qrpo" or (r["transform"] == qrpo_default and r["num_ref_rewards"] == n_max))
        ):
            sources.append((f"{LABELS[r['method']]} (β={r['beta']:g})", work / "runs" / r["id"] / "samples.jsonl"))
    loaded = {}
    for name, path in sources:
        if path.exists():
            loaded[name] = [json.loads(line) for line in path.read_text().splitlines()]
    lines = ["# Example completions (held-out prompts, seed 0, first sample; reward = VADER compound)\n"]
    for i in range(min(num_prompts, len(prompts))):
        lines.append(f"\n## {prompts[i]}\n")
        for name, records in loaded.items():
            rec = next((x for x in records if x["row_index"] == i and x["sample_index"] == 0), None)
            if rec:
                text = rec["completion"].replace("\n", " ").replace("|", "/")
                lines.append(f"- **{name}** ({rec['reward']:+.2f}, {rec['num_tokens']} tokens): {text}")
    (results_dir / "examples.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The powered comparison at matched KL
# ----------------------------------------------------------------------------------------------------------------

POWERED_LABELS = {
    ("qrpo", "pointwise"): "QRPO pointwise (all samples)",
    ("dpo", "pairs"): "DPO (best/worst pairs)",
    ("dpo", "all_pairs"): "DPO (pairs drawn from all pairs)",
}


def powered_report(cfg: ExperimentConfig, work: Path, results_dir: Path) -> dict | None:
    """The powered group's points (mean and s.e. over seeds per arm and beta), the learning rates lr_select picked,
    and each DPO arm against QRPO at matched KL, raw and length-controlled reward, with paired-by-prompt bootstrap
    intervals (experiments/powered.py). Writes powered_table.md, powered.csv and powered.png."""
    from plan import selected_learning_rates

    reference_by_seed = [
        [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted((work / "eval").glob("reference-s*/samples.jsonl"))
    ]
    reference_records = [record for records in reference_by_seed for record in records]
    runs_by_method: dict[str, list[dict]] = {}
    for path in sorted((work / "runs").glob("powered-*/result.json")):
        result = _load(path)
        records = [json.loads(line) for line in (path.parent / "samples.jsonl").read_text().splitlines()]
        for record, controlled in zip(records, length_controlled_rewards(records, reference_records), strict=True):
            record["length_controlled_reward"] = float(controlled)
        label = POWERED_LABELS[(result["method"], result["data"])]
        runs_by_method.setdefault(label, []).append(
            {"beta": result["beta"], "seed": result["seed"], "records": records, "lr": result["learning_rate"]}
        )
    if not runs_by_method:
        return None
    qrpo = POWERED_LABELS[("qrpo", "pointwise")]
    comparisons = [(qrpo, label) for label in runs_by_method if label != qrpo and qrpo in runs_by_method]
    num_prompts = cfg.split_num_eval
    out = {
        "learning_rates": {POWERED_LABELS[arm]: lr for arm, lr in selected_learning_rates(cfg, work).items()},
        "reference": _powered_reference(reference_by_seed, reference_records),
    }
    for key in ("reward", "length_controlled_reward"):
        _, points = matched_kl_bootstrap(runs_by_method, num_prompts, [], [], num_bootstrap=1, key=key)
        # each comparison at the KLs both of its curves cover (a third arm's range does not narrow it)
        grids, rows = {}, []
        for a, b in comparisons:
            grid = matched_kl_grid([p for p in points if p["method"] in (a, b)], cfg.powered_kl_step)
            grids[f"{a} vs {b}"] = grid
            pair = {a: runs_by_method[a], b: runs_by_method[b]}
            rows += matched_kl_bootstrap(
                pair, num_prompts, grid, [(a, b)], num_bootstrap=cfg.powered_bootstrap, key=key
            )[0]
        out[key] = {"kl_grid": grids, "comparisons": rows, "points": points}
    write_csv(results_dir / "powered.csv", out["reward"]["points"])
    (results_dir / "powered_table.md").write_text(powered_markdown(out, num_prompts, cfg))
    _powered_plot(
        results_dir / "powered.png",
        out["reward"]["points"],
        out["length_controlled_reward"]["points"],
        out["reference"],
    )
    return out


def _powered_reference(reference_by_seed: list[list[dict]], reference_records: list[dict]) -> dict | None:
    """pi_ref's own test samples: mean reward and length-controlled reward per seed, mean and s.e. over seeds."""
    if not reference_by_seed:
        return None
    per_seed = {
        "reward": [float(np.mean([r["reward"] for r in records])) for records in reference_by_seed],
        "length_controlled_reward": [
            float(np.mean(length_controlled_rewards(records, reference_records))) for records in reference_by_seed
        ],
    }
    out = {"seeds": len(reference_by_seed)}
    for key, values in per_seed.items():
        out[key], out[f"{key}_se"] = float(np.mean(values)), standard_error(np.array(values))
    return out


def powered_markdown(out: dict, num_prompts: int, cfg: ExperimentConfig) -> str:
    lines = [
        "# QRPO pointwise against DPO at matched KL\n",
        "Learning rates picked on the validation prompts (lr_select): "
        + ", ".join(f"{label} {lr:g}" for label, lr in out["learning_rates"].items())
        + ".\n",
        (
            f"Points: mean ± standard error over seeds; {num_prompts} test prompts x {cfg.eval_num_samples} samples "
            "per seed. Length-controlled reward: reward - slope x (length - the prompt's mean pi_ref length), the "
            "slope fitted within prompts on pi_ref's samples.\n"
        ),
        "| arm | beta | seeds | KL (nats) | reward | length-controlled reward |",
        "|---|---|---|---|---|---|",
    ]
    reference = out.get("reference")
    if reference:
        lines.append(
            f"| pi_ref | – | {reference['seeds']} | 0 | "
            f"{_fmt(reference['reward'], reference['reward_se'], signed=True)} | "
            f"{_fmt(reference['length_controlled_reward'], reference['length_controlled_reward_se'], signed=True)} |"
        )
    controlled = {(p["method"], p["beta"]): p for p in out["length_controlled_reward"]["points"]}
    for p in out["reward"]["points"]:
        c = controlled[(p["method"], p["beta"])]
        lines.append(
            f"| {p['method']} | {p['beta']:g} | {len(p['seeds'])} | {_fmt(p['kl'], p['kl_se'], 2)} "
            f"| {_fmt(p['reward'], p['reward_se'], signed=True)} "
            f"| {_fmt(c['length_controlled_reward'], c['length_controlled_reward_se'], signed=True)} |"
        )
    for key, title in (("reward", "reward"), ("length_controlled_reward", "length-controlled reward")):
        rows = out[key]["comparisons"]
        lines += [
            "",
            (
                f"Difference in {title} at matched KL (first arm minus second; 95% paired-by-prompt bootstrap "
                f"interval, {cfg.powered_bootstrap} draws; P = share of draws in which the first arm is better):"
            ),
            "",
            "| arms | KL | difference | 95% interval | P(first better) |",
            "|---|---|---|---|---|",
        ]
        for label, grid in out[key]["kl_grid"].items():
            if not grid:
                lines.append(f"| {label}: the two curves cover no common KL | | | | |")
        for r in rows:
            if r["difference"] is None:
                continue
            lines.append(
                f"| {r['a']} - {r['b']} | {r['kl']:g} | {r['difference']:+.3f} | "
                f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['p_a_better']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _powered_plot(path: Path, points: list[dict], controlled: list[dict], reference: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rows, key, title in (
        (axes[0], points, "reward", "reward"),
        (axes[1], controlled, "length_controlled_reward", "length-controlled reward"),
    ):
        for method in dict.fromkeys(r["method"] for r in rows):
            curve = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
            ax.errorbar(
                [r["kl"] for r in curve],
                [r[key] for r in curve],
                xerr=[r["kl_se"] or 0 for r in curve],
                yerr=[r[f"{key}_se"] or 0 for r in curve],
                fmt="o-",
                capsize=3,
                label=method,
            )
        if reference:
            ax.errorbar([0], [reference[key]], yerr=[reference[f"{key}_se"] or 0], fmt="ks", capsize=3, label="pi_ref")
        ax.set_xlabel("KL(pi || pi_ref), nats")
        ax.set_ylabel(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Test prompts; points = mean over {seeds_label(len(r['seeds']) for r in points)} per point, "
        "bars = standard error over seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
