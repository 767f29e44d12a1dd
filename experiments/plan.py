"""The runs of an experiment: which method, beta, seed and data each run trains with, and its id (its folder)."""

from __future__ import annotations

import math

from config import METHODS, ExperimentConfig

POWERED_GROUPS = ("lr_select", "powered")
# the powered comparison's arms: (method, training data) -> its betas' option
POWERED_ARMS = {
    ("qrpo", "pointwise"): "powered_betas_qrpo",
    ("dpo", "pairs"): "powered_betas_dpo",
    ("dpo", "all_pairs"): "powered_betas_dpo",
}


def run_id(spec: dict) -> str:
    if "residuals" in spec["groups"]:
        return f"residuals-{spec['name']}-s{spec['seed']}"
    if spec["groups"][0] in POWERED_GROUPS:
        prefix = "lrsel" if spec["groups"][0] == "lr_select" else "powered"
        return (
            f"{prefix}-{spec['method']}-{spec['data']}-b{spec['beta']:g}-lr{spec['learning_rate']:g}-s{spec['seed']}"
        )
    if spec["method"] == "qrpo":
        data = "pointwise-" if spec.get("data", "pairs") == "pointwise" else ""
        return f"qrpo-{data}{spec['transform']}-b{spec['beta']:g}-n{spec['num_ref_rewards']}-s{spec['seed']}"
    return f"{spec['method']}-b{spec['beta']:g}-s{spec['seed']}"


def qrpo_options(cfg: ExperimentConfig, method: str, transform: str | None = None, n: int | None = None) -> dict:
    """QRPO's own options of a run (transform, number of reference rewards, ties; the configuration's unless given);
    nothing for the other methods."""
    if method != "qrpo":
        return {}
    return {
        "transform": transform or cfg.methods_qrpo_transform,
        "num_ref_rewards": n or cfg.references_num_ref_rewards,
        "ties": cfg.methods_qrpo_ties,
    }


def train_steps(cfg: ExperimentConfig, num_pairs: int, epochs: int | None = None) -> int:
    """Optimizer steps of a pair run: ceil(pairs / batch) per epoch (the Trainer keeps the last, short batch)."""
    return math.ceil(num_pairs / cfg.train_batch_size) * int(cfg.train_epochs if epochs is None else epochs)


def run_specs(cfg: ExperimentConfig, selected_lr: dict | None = None) -> list[dict]:
    """The runs of the groups in `cfg.groups`, in that order (a run in several groups is planned once).

    - main: every method at its first beta, every eval seed (the method comparison)
    - qrpo_beta: QRPO's other betas (default transform, all references), `sweep_seeds`
    - num_ref_rewards: QRPO, first beta, n in `sweep_num_ref_rewards`, seeds `sweep_num_ref_rewards_seeds`
    - transform: QRPO with each transform and beta of `sweep_transforms`, `sweep_seeds`
    - baseline_beta: DPO / SimPO / REBEL at their other betas, `sweep_seeds`
    - frontier: every method at every beta of `frontier_sweep_betas_*`, every eval seed (the reward-KL frontiers)
    - residuals: the runs of `residuals_runs` (name -> method, beta, data, learning rate, warm-up, epochs,
      reference), seed `sweep_seeds[0]`, each with the step probe (experiments/residuals.py)
    - lr_select: each arm of the powered comparison (QRPO pointwise on every candidate, DPO on the best/worst pairs,
      DPO on pairs drawn from all pairs of the candidates) at its first beta with each of `powered_learning_rates`,
      seed `sweep_seeds[0]`, evaluated on the validation prompts
    - powered: every arm at each of its betas and every eval seed, at the learning rate `lr_select` picked for it
      (`selected_lr`: (method, data) -> rate; arms not yet picked are left out until their selection runs are done)
    - pointwise: QRPO trained pointwise on all `references_num_candidates` references of each prompt
      (`data="pointwise"`) at `frontier_sweep_pointwise_betas`, every eval seed; and its counterpart, DPO on the
      best/worst pairs of the same samples, which are the `frontier` group's DPO runs (planned once, in both groups)
    """
    seeds, sweep_seeds = cfg.eval_seeds, cfg.sweep_seeds
    specs = []

    def add(method, beta, seed, group, transform=None, n=None, data="pairs"):
        spec = {"method": method, "beta": float(beta), "seed": int(seed), "groups": [group]}
        if data != "pairs":
            spec["data"] = data
        spec.update(qrpo_options(cfg, method, transform, n))
        if method == "simpo":
            spec["gamma"] = float(beta) * cfg.methods_simpo_gamma_beta_ratio
        for existing in specs:
            if run_id(existing) == run_id(spec):
                if group not in existing["groups"]:
                    existing["groups"].append(group)
                return
        specs.append(spec)

    for group in cfg.groups:
        if group == "main":
            for seed in seeds:
                for method in METHODS:
                    add(method, cfg.betas(method)[0], seed, group)
        elif group == "qrpo_beta":
            for beta in cfg.betas("qrpo")[1:]:
                for seed in sweep_seeds:
                    add("qrpo", beta, seed, group)
        elif group == "num_ref_rewards":
            for seed in cfg.sweep_num_ref_rewards_seeds:
                for n in cfg.sweep_num_ref_rewards:
                    add("qrpo", cfg.betas("qrpo")[0], seed, group, n=n)
        elif group == "transform":
            for seed in sweep_seeds:
                for transform, betas in cfg.sweep_transforms.items():
                    for beta in betas:
                        add("qrpo", beta, seed, group, transform=transform)
        elif group == "baseline_beta":
            for method in METHODS[1:]:
                for beta in cfg.betas(method)[1:]:
                    for seed in sweep_seeds:
                        add(method, beta, seed, group)
        elif group == "frontier":
            # Seed-major, so that a partial run has every curve at the first seed; within a seed the comparison the
            # profile exists for first (QRPO pointwise, when the pointwise group is planned, and DPO on the pairs of
            # the same samples), then QRPO on pairs, REBEL, and SimPO (no reference model) last.
            for seed in seeds:
                if "pointwise" in cfg.groups:
                    for beta in cfg.frontier_sweep_pointwise_betas:
                        add("qrpo", beta, seed, "pointwise", data="pointwise")
                for method in ("dpo", "qrpo", "rebel", "simpo"):
                    for beta in cfg.frontier_betas(method):
                        add(method, beta, seed, group)
        elif group == "pointwise":
            for seed in seeds:
                for beta in cfg.frontier_sweep_pointwise_betas:
                    add("qrpo", beta, seed, group, data="pointwise")
            for beta in cfg.frontier_betas("dpo"):
                for seed in seeds:
                    add("dpo", beta, seed, group)
        elif group == "lr_select":
            for (method, data), option in POWERED_ARMS.items():
                for lr in cfg.powered_learning_rates:
                    specs.append(powered_spec(cfg, method, data, getattr(cfg, option)[0], sweep_seeds[0], lr, group))
        elif group == "powered":
            for seed in seeds:
                for (method, data), option in POWERED_ARMS.items():
                    lr = (selected_lr or {}).get((method, data))
                    if lr is None:
                        continue
                    for beta in getattr(cfg, option):
                        specs.append(powered_spec(cfg, method, data, beta, seed, lr, group))
        elif group == "residuals":
            for name, options in (cfg.residuals_runs or {}).items():
                specs.append(residual_spec(cfg, name, options, sweep_seeds[0]))
        else:
            raise ValueError(f"Unknown run group {group!r}.")
    return specs


RESIDUAL_OPTIONS = {"method", "beta", "data", "learning_rate", "warmup_ratio", "epochs", "reference"}


def residual_spec(cfg: ExperimentConfig, name: str, options: dict, seed: int) -> dict:
    """A run of the `residuals` group: the options given, the experiment's training settings for the rest.

    data: "pairs" (the best/worst pairs), "pair_sides" (the same sequences as pointwise rows, 2 x batch rows a step:
    the pairs' targets without the paired batch layout) or "pointwise" (every candidate); reference: "precomputed"
    (one pass before training, as the frontier) or "live" (the reference model's forward every step)."""
    unknown = set(options) - RESIDUAL_OPTIONS
    if unknown:
        raise ValueError(
            f"residuals_runs[{name!r}]: unknown options {sorted(unknown)}; known: {sorted(RESIDUAL_OPTIONS)}"
        )
    method = options.get("method", "qrpo")
    if method not in ("qrpo", "rebel"):
        raise ValueError(f"residuals_runs[{name!r}]: method {method!r}; the probe needs QRPOTrainer (qrpo or rebel).")
    data = options.get("data", "pairs")
    if data not in ("pairs", "pair_sides", "pointwise") or (method == "rebel" and data != "pairs"):
        raise ValueError(f"residuals_runs[{name!r}]: data {data!r} (pairs, pair_sides, pointwise; REBEL: pairs).")
    if options.get("reference", "precomputed") not in ("precomputed", "live"):
        raise ValueError(f"residuals_runs[{name!r}]: reference is 'precomputed' or 'live'.")
    spec = {
        "name": name,
        "method": method,
        "beta": float(options.get("beta", cfg.betas(method)[0])),
        "seed": int(seed),
        "groups": ["residuals"],
        "data": data,
        "learning_rate": float(options.get("learning_rate", cfg.train_learning_rate)),
        "warmup_ratio": float(options.get("warmup_ratio", cfg.train_warmup_ratio)),
        "epochs": int(options.get("epochs", cfg.train_epochs)),
        "reference": options.get("reference", "precomputed"),
    }
    return spec | qrpo_options(cfg, method)


def powered_spec(cfg: ExperimentConfig, method: str, data: str, beta: float, seed: int, lr: float, group: str) -> dict:
    """A run of the powered comparison: every arm trains `train_steps` optimizer steps of 2 x batch sequences (QRPO:
    that many of its pointwise rows; DPO: that many pairs of its own data), at the given learning rate."""
    spec = {
        "method": method,
        "beta": float(beta),
        "seed": int(seed),
        "groups": [group],
        "data": data,
        "learning_rate": float(lr),
        "eval_split": "validation" if group == "lr_select" else "eval",
        "fixed_steps": True,
    }
    return spec | qrpo_options(cfg, method)


def selected_learning_rates(cfg: ExperimentConfig, work) -> dict:
    """The learning rate `lr_select` picked for each arm whose selection runs are all done: the highest validation
    reward among the rates whose validation KL is at most `powered_max_kl` (the smaller rate on a tie; the smallest
    rate when no rate is under the KL bound). Arms with
    a selection run still to do are missing."""
    import dataclasses
    import json
    from pathlib import Path

    chosen = {}
    specs = run_specs(dataclasses.replace(cfg, groups=["lr_select"]))
    for arm in POWERED_ARMS:
        results = []
        for spec in specs:
            if (spec["method"], spec["data"]) != arm:
                continue
            path = Path(work) / "runs" / run_id(spec) / "result.json"
            if not path.exists():
                break
            results.append(json.loads(path.read_text()))
        else:
            allowed = [r for r in results if r["eval"]["kl"] <= cfg.powered_max_kl]
            best = (
                max(allowed, key=lambda r: (r["eval"]["reward"], -r["learning_rate"]))  # a tie: the smaller rate
                if allowed
                else min(results, key=lambda r: r["learning_rate"])
            )
            chosen[arm] = best["learning_rate"]
    return chosen
