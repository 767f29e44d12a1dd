"""The runs of an experiment: which method, beta, seed and data each run trains with, and its id (its folder)."""

from __future__ import annotations

import math

from config import METHODS, ExperimentConfig


def run_id(spec: dict) -> str:
    if spec["method"] == "qrpo":
        data = "pointwise-" if spec.get("data", "pairs") == "pointwise" else ""
        return f"qrpo-{data}{spec['transform']}-b{spec['beta']:g}-n{spec['num_ref_rewards']}-s{spec['seed']}"
    return f"{spec['method']}-b{spec['beta']:g}-s{spec['seed']}"


def train_steps(cfg: ExperimentConfig, num_pairs: int) -> int:
    """Optimizer steps of a pair run: ceil(pairs / batch) per epoch (the Trainer keeps the last, short batch)."""
    return math.ceil(num_pairs / cfg.train_batch_size) * int(cfg.train_epochs)


def run_specs(cfg: ExperimentConfig) -> list[dict]:
    """The runs of the groups in `cfg.groups`, in that order (a run in several groups is planned once).

    - main: every method at its first beta, every eval seed (the method comparison)
    - qrpo_beta: QRPO's other betas (default transform, all references), `sweep_seeds`
    - num_ref_rewards: QRPO, first beta, n in `sweep_num_ref_rewards`, seeds `sweep_num_ref_rewards_seeds`
    - transform: QRPO with each transform and beta of `sweep_transforms`, `sweep_seeds`
    - baseline_beta: DPO / SimPO / REBEL at their other betas, `sweep_seeds`
    - frontier: every method at every beta of `frontier_sweep_betas_*`, every eval seed (the reward-KL frontiers)
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
        if method == "qrpo":
            spec.update(
                transform=transform or cfg.methods_qrpo_transform,
                num_ref_rewards=n or cfg.references_num_ref_rewards,
                ties=cfg.methods_qrpo_ties,
            )
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
        else:
            raise ValueError(f"Unknown run group {group!r}.")
    return specs
