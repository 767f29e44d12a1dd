"""The summary of an iterative run: one entry per evaluated policy, as JSON, a Markdown table and a plot.

Read from the stages' folders (`evaluate`'s `summary.json`; the round reference's log-probs of the evaluation samples
from `evaluate-ref-logps`), so it can be rewritten at any time, and is after every evaluation.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from ..columns import POLICY_LOGP, REF_LOGP
from ..precompute.chunks import read_manifest
from ..precompute.io import write_json
from .config import IterateConfig
from .plan import EVALUATE, EVALUATE_REF_LOGPS, START, TRAIN_DATA, reference_of, round_dir

logger = logging.getLogger("trl_qrpo.iterative")

SUMMARY_JSON, SUMMARY_MD, SUMMARY_PNG = "summary.json", "summary.md", "summary.png"


def _mean_stderr(values) -> tuple[float, float | None]:
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


def _entry(
    label: str, evaluation: Path, round_index: int | None, reference: str, config: IterateConfig
) -> dict | None:
    path = evaluation / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    entry = {
        "policy": label,
        "round": round_index,
        "reference": reference,
        "num_samples": summary["num_samples"],
        "mean_reward": summary["mean_reward"],
        "stderr_reward": summary["stderr_reward"],
        "mean_num_tokens": summary["mean_num_tokens"],
        # The starting model's own samples: its KL to itself is 0.
        "kl_to_start": summary["kl"] if summary["kl"] is not None else 0.0,
        "kl_to_start_stderr": summary["kl_stderr"] if summary["kl"] is not None else 0.0,
    }
    entry["kl_to_reference"], entry["kl_to_reference_stderr"] = entry["kl_to_start"], entry["kl_to_start_stderr"]
    if round_index is not None and reference != config.model_name_or_path:
        own = evaluation.parent / EVALUATE_REF_LOGPS
        if not (read_manifest(own) or {}).get("complete"):
            entry["kl_to_reference"] = entry["kl_to_reference_stderr"] = None
        else:
            from datasets import load_from_disk

            samples = load_from_disk(str(own))
            logratio = np.asarray(samples[POLICY_LOGP]) - np.asarray(samples[REF_LOGP])
            entry["kl_to_reference"], entry["kl_to_reference_stderr"] = _mean_stderr(logratio)
    if round_index is not None and (evaluation.parent / TRAIN_DATA).is_dir():
        from datasets import load_from_disk

        entry["train_rows"] = len(load_from_disk(str(evaluation.parent / TRAIN_DATA)))
    return entry


def collect(config: IterateConfig) -> list[dict]:
    """The entries of every evaluation done so far: the starting model, then the policy of each round."""
    entries = []
    start = _entry("start", Path(config.output_dir) / START / EVALUATE, None, config.model_name_or_path, config)
    if start is not None:
        entries.append(start)
    for r in range(config.num_rounds):
        entry = _entry(f"round {r}", round_dir(config, r) / EVALUATE, r, reference_of(config, r), config)
        if entry is not None:
            entries.append(entry)
    return entries


def _cell(value, stderr=None, digits=3) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return text if stderr is None else f"{text} ± {stderr:.{digits}f}"


def markdown_table(entries: list[dict]) -> str:
    lines = [
        "| policy | reward (± s.e.) | KL to start, nats (± s.e.) | KL to its reference (± s.e.) | tokens | samples |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['policy']} | {_cell(e['mean_reward'], e['stderr_reward'])} | "
            f"{_cell(e['kl_to_start'], e['kl_to_start_stderr'], 2)} | "
            f"{_cell(e['kl_to_reference'], e['kl_to_reference_stderr'], 2)} | {e['mean_num_tokens']:.1f} | "
            f"{e['num_samples']} |"
        )
    return "\n".join(lines) + "\n"


def _plot(entries: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info(f"matplotlib is not installed: no {path.name} (pip install matplotlib).")
        return False
    x = list(range(len(entries)))
    labels = [e["policy"] for e in entries]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    panels = (("mean_reward", "stderr_reward", "reward"), ("kl_to_start", "kl_to_start_stderr", "KL to start (nats)"))
    for ax, (key, error, name) in zip(axes, panels, strict=True):
        ax.errorbar(x, [e[key] for e in entries], yerr=[e[error] or 0 for e in entries], marker="o", capsize=3)
        ax.set_xticks(x, labels, rotation=30)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title + " (error bars: standard errors over evaluation samples)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_summary(config: IterateConfig) -> dict:
    """Write `summary.json`, `summary.md` and (with matplotlib) `summary.png` into `output_dir`; return the summary."""
    output_dir = Path(config.output_dir)
    entries = collect(config)
    kind = "anchored to the starting model" if config.anchored else "each round's reference: the last policy"
    summary = {"num_rounds": config.num_rounds, "anchored": config.anchored, "policies": entries}
    write_json(output_dir / SUMMARY_JSON, summary)
    (output_dir / SUMMARY_MD).write_text(f"# Iterative QRPO ({kind})\n\n" + markdown_table(entries))
    if entries:
        _plot(entries, output_dir / SUMMARY_PNG, f"Iterative QRPO, {kind}")
    return summary
