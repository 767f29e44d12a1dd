"""Where QRPO's and REBEL's training residuals come from (the `residuals` group, the --residuals profile).

The frontier's paired QRPO and REBEL runs ended with mean training losses 10-1000x those of pointwise QRPO at the same
beta. This module measures, at every optimizer step of a run, the residual of the sequences of that step's batch
just before the step and just after it, in nats of log-ratio (the regression's own unit, beta-free):

- QRPO: `target / beta - log pi/pi_ref` per sequence (`target = f(q) - beta log Z`);
- REBEL: `(R_c - R_r) / beta - (logratio_c - logratio_r)` per pair.

"before" is what the step's loss saw (the batch's first visit in epoch 1); "after" is the same sequences right after
the optimizer step, which is what a revisit in a later epoch sees, up to what later steps change. The step's change
of each sequence's log-ratio (after - before) shows how far one Adam step moves the sequences it was taken on,
against the size of their targets.

`attach_step_probe(trainer)` adds the three figures to the trainer's logged metrics (`probe/...`, one value per step
with `logging_steps=1`); `residuals_report` writes the table and plot of the group from the runs' per-step logs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PROBE_KEYS = ("probe/residual_before_rms", "probe/residual_after_rms", "probe/logratio_change_abs_mean")


def _residual_nats(trainer, inputs, logratios):
    """Per-sequence (QRPO) or per-pair (REBEL) residual of the trainer's loss, in nats of log-ratio."""
    import torch

    if trainer.args.loss_type[0] == "rebel":
        side, reward = inputs["side"], inputs["reward"].to(logratios.device)
        margin_target = (reward[side == 0] - reward[side == 1]) / trainer.args.beta
        return margin_target - (logratios[side == 0] - logratios[side == 1])
    beta = inputs["beta"].to(logratios.device, torch.float32)
    return inputs["target"].to(logratios.device, torch.float32) / beta - logratios


def attach_step_probe(trainer) -> None:
    """Log, every optimizer step, the residual of that step's batch before and after the step (QRPOTrainer only).

    Two extra forward passes per step (no gradients). Needs `gradient_accumulation_steps=1` (one batch per step)."""
    import torch
    from transformers import TrainerCallback

    if trainer.args.gradient_accumulation_steps != 1:
        raise ValueError("The step probe needs gradient_accumulation_steps=1 (one batch per optimizer step).")
    original = trainer.training_step
    seen = {}

    def logratios(inputs):
        with torch.no_grad():
            logps, ref_logps, _ = trainer.sequence_log_probs(trainer.model, inputs)
        return (logps - ref_logps).double()

    def training_step(model, inputs, *args, **kwargs):
        seen["inputs"] = inputs
        seen["before"] = logratios(inputs)
        return original(model, inputs, *args, **kwargs)

    class StepProbe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            inputs, before = seen.pop("inputs"), seen.pop("before")
            after = logratios(inputs)
            metrics = trainer._metrics["train"]
            for key, values in (
                ("probe/residual_before_rms", _residual_nats(trainer, inputs, before)),
                ("probe/residual_after_rms", _residual_nats(trainer, inputs, after)),
            ):
                metrics[key].append(float(values.square().mean().sqrt()))
            metrics["probe/logratio_change_abs_mean"].append(float((after - before).abs().mean()))

    trainer.training_step = training_step
    trainer.add_callback(StepProbe())


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _residual_nats_logged(step: dict, run: dict) -> float | None:
    """The trainer's own pre-step residual of a logged step, in nats (QRPO: residual/rms / beta; REBEL: sqrt(loss))."""
    if run["method"] == "rebel":
        return math.sqrt(step["loss"]) if "loss" in step else None
    value = step.get("residual/rms")
    return None if value is None else value / run["beta"]


def residual_rows(runs: list[dict]) -> list[dict]:
    """One row per run of the `residuals` group: its settings and the residuals of its first and later epochs."""
    rows = []
    for run in runs:
        if "residuals" not in run.get("groups", []):
            continue
        log = [h for h in run["train"]["log_history"] if "loss" in h]
        epochs = np.array([h["epoch"] for h in log])
        steps_per_epoch = int(np.sum(epochs <= 1 + 1e-9))
        first, later = log[:steps_per_epoch], log[steps_per_epoch:]

        def rms(steps, key=None, run=run):
            values = [_residual_nats_logged(h, run) if key is None else h.get(key) for h in steps]
            values = [v for v in values if v is not None]
            return float(np.sqrt(np.mean(np.square(values)))) if values else None

        def mean(steps, key):
            values = [h[key] for h in steps if key in h]
            return float(np.mean(values)) if values else None

        rows.append(
            {
                "id": run["id"],
                "name": run["name"],
                "method": run["method"],
                "data": run.get("data", "pairs"),
                "beta": run["beta"],
                "learning_rate": run["learning_rate"],
                "warmup_ratio": run["warmup_ratio"],
                "epochs": run["epochs"],
                "reference": run["reference"],
                "steps": len(log),
                "residual_epoch1_nats": rms(first),
                "residual_later_nats": rms(later),
                "residual_first_revisit_nats": _residual_nats_logged(later[0], run) if later else None,
                # epoch 1: each batch right after its own step, and how far that step moved its sequences
                "residual_after_step_epoch1_nats": rms(first, "probe/residual_after_rms"),
                "logratio_change_per_step_epoch1_nats": mean(first, "probe/logratio_change_abs_mean"),
                "logratio_change_per_step_nats": mean(log, "probe/logratio_change_abs_mean"),
                # at step 1 the policy is the reference (log-ratio 0): the residual is the targets' own size
                "target_size_nats": _residual_nats_logged(log[0], run) if log else None,
                "train_loss": run["train"]["train_loss"],
                "kl": run["eval"]["kl"],
                "reward": run["eval"]["reward"],
            }
        )
    return rows


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def residuals_markdown(rows: list[dict], reference: dict | None) -> str:
    lines = [
        "# Training residuals, step by step (nats of log-ratio; seed 0)\n",
        (
            "Residual = target / beta - log pi/pi_ref per sequence (QRPO), (R_c - R_r) / beta - margin per pair "
            "(REBEL), RMS over steps. *epoch 1, before*: the trainer's own residual over the first epoch, each batch "
            "seen for the first time; *epoch 1, after its step*: the same batches right after their own optimizer "
            "step (the step probe); *|change| / step*: mean absolute change of a step's sequences' log-ratios in that "
            "one step, over epoch 1; *first revisit*: the first step of epoch 2; *epochs 2+*: every later step. KL "
            "and reward: 96 fresh samples on the 48 held-out prompts (one seed; reward standard error about 0.045).\n"
        ),
        (
            "| run | method | data | beta | lr | warm-up | reference | epoch 1, before | epoch 1, after its step | "
            "\\|change\\| / step | first revisit | epochs 2+ | train loss | KL | reward |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['method']} | {r['data']} | {r['beta']:g} | {r['learning_rate']:.0e} | "
            f"{r['warmup_ratio']:g} | {r['reference']} | {_fmt(r['residual_epoch1_nats'])} | "
            f"{_fmt(r['residual_after_step_epoch1_nats'])} | {_fmt(r['logratio_change_per_step_epoch1_nats'])} | "
            f"{_fmt(r['residual_first_revisit_nats'])} | {_fmt(r['residual_later_nats'])} | "
            f"{_fmt(r['train_loss'], 3)} | {_fmt(r['kl'])} | "
            f"{r['reward']:+.3f} |"
        )
    if reference:
        lines.append(f"\npi_ref on the same held-out prompts: reward {reference['reward']:+.3f}.")
    return "\n".join(lines) + "\n"


def residuals_plot(path: Path, runs: list[dict], rows: list[dict]) -> None:
    """Pre-step residual (the trainer's) and post-step residual (the probe) per step, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_id = {r["id"]: r for r in runs}
    n = len(rows)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 3.2 * ((n + cols - 1) // cols)))
    for ax, row in zip(np.atleast_1d(axes).ravel(), rows, strict=False):
        run = by_id[row["id"]]
        log = [h for h in run["train"]["log_history"] if "loss" in h]
        steps = np.arange(1, len(log) + 1)
        before = [_residual_nats_logged(h, run) for h in log]
        after = [h.get("probe/residual_after_rms") for h in log]
        ax.semilogy(steps, before, "o-", ms=3, label="before its step (the loss)")
        if any(a is not None for a in after):
            ax.semilogy(steps, after, "s--", ms=3, label="same batch after its step")
        ax.axhline(row["target_size_nats"] or np.nan, color="gray", lw=0.8, ls=":", label="targets' size (step 1)")
        per_epoch = int(np.sum(np.array([h["epoch"] for h in log]) <= 1 + 1e-9))
        for boundary in range(per_epoch, len(log), per_epoch):
            ax.axvline(boundary + 0.5, color="k", lw=0.6)
        ax.set_title(f"{row['name']} (KL {row['kl']:.1f})", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("residual RMS, nats")
    for ax in np.atleast_1d(axes).ravel()[n:]:
        ax.set_visible(False)
    np.atleast_1d(axes).ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
