#!/usr/bin/env python
"""QRPO, DPO, SimPO and REBEL on one real task, on a CPU: "answer these prompts more positively".

    python experiments/run.py --config experiments/config.yaml            # everything (~60 min on 2 idle cores)
    python experiments/run.py --config experiments/config.yaml --quick    # the same pipeline, small (~9 min)
    python experiments/run.py --config experiments/config.yaml --comparison   # the 4 methods x 3 seeds only (~27 min)
    python experiments/run.py --config experiments/config.yaml --frontier     # reward-KL frontiers (~2 h 20 min, measured)

Stages (each resumes: finished work in `work_dir` is skipped, so a killed run continues when started again):

1. split       prompts file -> train / held-out eval prompts (seeded shuffle)
2. references  `num_candidates + num_ref_rewards` samples per train prompt from pi_ref (generate_references)
3. score       VADER sentiment of every reference (score_dataset + trl_qrpo.rewards.vader_sentiment)
4. pairs       best and worst of the first `num_candidates` references (build_offpolicy_dataset, "best_worst");
               the quantiles use the other `num_ref_rewards` references, which were not candidates
   pointwise   (only when a run needs it) every one of the first `num_candidates` references as its own row
               (build_offpolicy_dataset, "pointwise"), the same independent references for the quantiles
5. reference   evaluate pi_ref itself (evaluate_policy) with every eval seed
6. runs        for each method / beta / seed (and the QRPO sweep): train on the same pairs with the same steps, batch
               and schedule, then evaluate on the held-out prompts: reward, KL (mean sequence log-ratio of the
               policy's own samples), length, length bias
7. report      tables (JSON, CSV) and PNG plots in `results_dir`

Methods: QRPO (trl_qrpo.QRPOTrainer), DPO (trl.DPOTrainer), SimPO (trl.experimental.cpo.CPOTrainer with
loss_type="simpo", cpo_alpha=0, gamma = 0.5 beta) and REBEL (QRPOTrainer with loss_type="rebel").
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
try:
    import trl_qrpo  # noqa: F401
except ImportError:  # running from a clone without `pip install .`
    sys.path.insert(0, str(REPO))
from trl_qrpo.offline import use_offline_defaults  # noqa: E402

use_offline_defaults()

import numpy as np  # noqa: E402
import yaml  # noqa: E402


METHODS = ("qrpo", "dpo", "simpo", "rebel")
LABELS = {"qrpo": "QRPO", "dpo": "DPO", "simpo": "SimPO", "rebel": "REBEL", "reference": "reference (pi_ref)"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("transforms",):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


PROFILES = ("quick", "comparison", "frontier")  # top-level sections of the config that override the rest when chosen


def load_config(path: str, profile: str | None, overrides: list[str]) -> dict:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    profiles = {name: cfg.pop(name, {}) for name in PROFILES}
    if profile:
        cfg = deep_merge(cfg, profiles[profile])
    for item in overrides:  # --set train.epochs=1
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    for key in ("work_dir", "results_dir", "prompts_file"):
        p = Path(cfg[key])
        cfg[key] = str(p if p.is_absolute() else REPO / p)
    return cfg


def load_reward(spec: str):
    """A reward function given as "module:function" (modules in experiments/ are importable)."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def resolve_model(name: str) -> str:
    if name == "smollm2":
        from trl_qrpo.models import prepare_smollm2

        return str(prepare_smollm2())
    return str(Path(name).expanduser().resolve())


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


def as_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------------------------------------------
# Stages 1-4: data
# ----------------------------------------------------------------------------------------------------------------


def stage_split(cfg: dict, work: Path):
    from datasets import Dataset

    path = work / "prompts.json"
    if not path.exists():
        prompts = [line.strip() for line in open(cfg["prompts_file"]) if line.strip() and not line.startswith("#")]
        order = list(range(len(prompts)))
        random.Random(cfg["split"]["seed"]).shuffle(order)
        n_train, n_eval = cfg["split"]["num_train"], cfg["split"]["num_eval"]
        if n_train + n_eval > len(prompts):
            raise ValueError(f"{n_train} train + {n_eval} eval prompts requested, the file has {len(prompts)}.")
        split = {
            "train": [prompts[i] for i in order[:n_train]],
            "eval": [prompts[i] for i in order[n_train : n_train + n_eval]],
        }
        write_json(path, split)
    split = json.loads(path.read_text())
    train = Dataset.from_dict(
        {"prompt": [as_messages(p) for p in split["train"]], "prompt_index": list(range(len(split["train"])))}
    )
    evaluation = Dataset.from_dict({"prompt": [as_messages(p) for p in split["eval"]]})
    return train, evaluation


def stage_references(cfg: dict, work: Path, train, model_path: str):
    from trl_qrpo.precompute import GenerateConfig, generate_references

    r = cfg["references"]
    return generate_references(
        train,
        GenerateConfig(
            model_name_or_path=model_path,
            num_generations=r["num_candidates"] + r["num_ref_rewards"],
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=r["max_new_tokens"],
            seed=r["seed"],
            batch_size=r["batch_size"],
            chunk_size=r["chunk_size"],
            backend="transformers",
            dtype=cfg["dtype"],
            device="cpu",
            output_dir=str(work / "references"),
        ),
    )


def stage_score(cfg: dict, work: Path, refs):
    from trl_qrpo.precompute import ScoreConfig, score_dataset

    args = ScoreConfig(output_dir=str(work / "scored"), chunk_size=cfg["references"]["chunk_size"])
    return score_dataset(refs, args, reward_funcs=[load_reward(cfg["reward"])])


def stage_pairs(cfg: dict, work: Path, scored):
    """The training pairs (same for every method) and the data statistics.

    `build_offpolicy_dataset(mode="best_worst", num_candidates=C)` picks the best and the worst of the first C
    references. Their quantiles are then taken among the *other* N references only (`ref_rewards` = rewards of
    references C..C+N-1, `*_in_ref_rewards` = False): those were drawn from pi_ref independently of the selection,
    so `num_ref_rewards = n` in the trainer means "n reference rewards", and n = 1 is possible. (The package's own
    layout puts both of the pair's rewards first in `ref_rewards`, where the first n entries would include the other
    side of the pair; see experiments/README.md.)
    """
    from datasets import load_from_disk

    from trl_qrpo.precompute import BuildOffPolicyConfig, build_offpolicy_dataset

    path = work / "pairs"
    r = cfg["references"]
    C, N = r["num_candidates"], r["num_ref_rewards"]
    if not (path / "dataset_info.json").exists():
        pairs = build_offpolicy_dataset(
            scored, BuildOffPolicyConfig(mode="best_worst", num_candidates=C, drop_ties=True)
        )
        if len(pairs) == 0:
            raise ValueError(
                f"Every prompt's {C} candidates have the same reward: no training pair. Use more candidates, longer "
                "completions, or another reward."
            )
        all_refs = scored["ref_rewards"]
        independent = [list(all_refs[i][C : C + N]) for i in pairs["prompt_index"]]
        for row, refs in zip(pairs, independent, strict=True):
            assert len(refs) == N
            # the package's order: own rewards, then the non-candidates (= references C.., in order), then the rest
            assert row["ref_rewards"][2 : 2 + N] == refs
        pairs = pairs.remove_columns(["ref_rewards", "chosen_in_ref_rewards", "rejected_in_ref_rewards"])
        pairs = pairs.add_column("ref_rewards", independent)
        pairs.save_to_disk(str(path))
        write_json(work / "data_stats.json", data_stats(scored, pairs, C, N))
    return load_from_disk(str(path))


def stage_pointwise(cfg: dict, work: Path, scored, pairs):
    """Pointwise rows: each of the first C references of every prompt that has a training pair, with its own reward.

    The same samples the pairs were picked from (the pair = best and worst of them), so DPO on the pairs and QRPO
    on these rows see the same completions; QRPO sees all C of them, each alone with its reward, no pair. Quantiles
    among the same N independent references as the pairs (references C..C+N-1; `in_ref_rewards` = False).
    """
    from datasets import load_from_disk

    from trl_qrpo.precompute import BuildOffPolicyConfig, build_offpolicy_dataset

    path = work / "pointwise"
    r = cfg["references"]
    C, N = r["num_candidates"], r["num_ref_rewards"]
    if not (path / "dataset_info.json").exists():
        rows = build_offpolicy_dataset(scored, BuildOffPolicyConfig(mode="pointwise", num_candidates=C))
        keep = set(pairs["prompt_index"])
        rows = rows.filter(lambda p: p in keep, input_columns=["prompt_index"])
        all_refs = scored["ref_rewards"]
        independent = [list(all_refs[i][C : C + N]) for i in rows["prompt_index"]]
        for row, refs in zip(rows, independent, strict=True):
            assert row["in_ref_rewards"] and row["ref_rewards"][1 : 1 + N] == refs  # own reward, then C..C+N-1
        rows = rows.remove_columns(["ref_rewards", "in_ref_rewards"]).add_column("ref_rewards", independent)
        if len(rows) != C * len(pairs):
            raise ValueError(f"{len(rows)} pointwise rows for {len(pairs)} pairs of {C} candidates.")
        rows.save_to_disk(str(path))
        refs = np.array(independent)
        reward = np.array(rows["reward"])
        write_json(
            work / "pointwise_stats.json",
            {
                "num_rows": len(rows),
                "rows_per_prompt": C,
                "reward_mean": float(reward.mean()),
                "quantile_mean": float((refs <= reward[:, None]).mean()),
                "fraction_of_rows_in_a_pair": 2 / C,
            },
        )
    return load_from_disk(str(path))


def train_steps(cfg: dict, num_pairs: int) -> int:
    """Optimizer steps of a pair run: ceil(pairs / batch) per epoch (the Trainer keeps the last, short batch)."""
    t = cfg["train"]
    return math.ceil(num_pairs / t["batch_size"]) * int(t["epochs"])


def data_stats(scored, pairs, C: int, N: int) -> dict:
    rewards = np.array(scored["ref_rewards"], dtype=np.float64)  # [prompts, C + N]
    lengths = np.array(scored["ref_num_tokens"], dtype=np.float64)
    truncated = np.array(scored["ref_truncated"], dtype=bool)
    from scipy.stats import spearmanr

    chosen, rejected = np.array(pairs["chosen_reward"]), np.array(pairs["rejected_reward"])
    # quantile of the chosen/rejected completions among the N independent references (<=, as in the paper)
    refs = np.array(pairs["ref_rewards"])
    q_chosen = (refs <= chosen[:, None]).mean(axis=1)
    q_rejected = (refs <= rejected[:, None]).mean(axis=1)
    per_prompt_std = rewards.std(axis=1)
    return {
        "num_prompts": int(rewards.shape[0]),
        "references_per_prompt": int(rewards.shape[1]),
        "num_candidates": C,
        "num_ref_rewards": N,
        "num_pairs": len(pairs),
        "pairs_dropped_for_ties": int(rewards.shape[0] - len(pairs)),
        "reference_reward_mean": float(rewards.mean()),
        "reference_reward_std": float(rewards.std()),
        "reference_reward_fraction_exactly_zero": float((rewards == 0).mean()),
        "reference_reward_fraction_tied_within_prompt": float(
            np.mean([1 - len(np.unique(row)) / len(row) for row in rewards])
        ),
        "reference_reward_mean_within_prompt_std": float(per_prompt_std.mean()),
        "reference_reward_between_prompt_std_of_means": float(rewards.mean(axis=1).std()),
        "reference_mean_num_tokens": float(lengths.mean()),
        "reference_truncated_fraction": float(truncated.mean()),
        "reference_reward_length_spearman": float(spearmanr(rewards.ravel(), lengths.ravel()).statistic),
        "chosen_reward_mean": float(chosen.mean()),
        "rejected_reward_mean": float(rejected.mean()),
        "chosen_quantile_mean": float(q_chosen.mean()),
        "rejected_quantile_mean": float(q_rejected.mean()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Runs: specifications, training, evaluation
# ----------------------------------------------------------------------------------------------------------------


def run_id(spec: dict) -> str:
    if spec["method"] == "qrpo":
        data = "pointwise-" if spec.get("data", "pairs") == "pointwise" else ""
        return f"qrpo-{data}{spec['transform']}-b{spec['beta']:g}-n{spec['num_ref_rewards']}-s{spec['seed']}"
    return f"{spec['method']}-b{spec['beta']:g}-s{spec['seed']}"


def run_specs(cfg: dict) -> list[dict]:
    """The runs of the groups in `cfg["groups"]`, in that order (a run in several groups is planned once).

    - main: every method at its first beta, every eval seed (the method comparison)
    - qrpo_beta: QRPO's other betas (default transform, all references), `sweep.seeds`
    - num_ref_rewards: QRPO, first beta, n in `sweep.num_ref_rewards`, seeds `sweep.num_ref_rewards_seeds`
    - transform: QRPO with each transform and beta of `sweep.transforms`, `sweep.seeds`
    - baseline_beta: DPO / SimPO / REBEL at their other betas, `sweep.seeds`
    - frontier: every method at every beta of `frontier_sweep.betas`, every eval seed (the reward-KL frontiers)
    - pointwise: QRPO trained pointwise on all `num_candidates` references of each prompt (`data="pointwise"`) at
      `frontier_sweep.pointwise_betas`, every eval seed; and its counterpart, DPO on the best/worst pairs of the
      same samples, which are the `frontier` group's DPO runs (planned once, in both groups)
    """
    seeds, sweep_seeds = cfg["eval"]["seeds"], cfg["sweep"]["seeds"]
    n_max = cfg["references"]["num_ref_rewards"]
    m = cfg["methods"]
    specs = []

    def add(method, beta, seed, group, transform=None, n=None, data="pairs"):
        spec = {"method": method, "beta": float(beta), "seed": int(seed), "groups": [group]}
        if data != "pairs":
            spec["data"] = data
        if method == "qrpo":
            spec.update(transform=transform or m["qrpo"].get("transform", "identity"), num_ref_rewards=n or n_max)
            spec["ties"] = m["qrpo"].get("ties", "random")
        if method == "simpo":
            spec["gamma"] = float(beta) * m["simpo"].get("gamma_beta_ratio", 0.5)
        for existing in specs:
            if run_id(existing) == run_id(spec):
                if group not in existing["groups"]:
                    existing["groups"].append(group)
                return
        specs.append(spec)

    for group in cfg["groups"]:
        if group == "main":
            for seed in seeds:
                for method in METHODS:
                    add(method, m[method]["betas"][0], seed, group)
        elif group == "qrpo_beta":
            for beta in m["qrpo"]["betas"][1:]:
                for seed in sweep_seeds:
                    add("qrpo", beta, seed, group)
        elif group == "num_ref_rewards":
            for seed in cfg["sweep"].get("num_ref_rewards_seeds", sweep_seeds):
                for n in cfg["sweep"]["num_ref_rewards"]:
                    add("qrpo", m["qrpo"]["betas"][0], seed, group, n=n)
        elif group == "transform":
            for seed in sweep_seeds:
                for transform, betas in cfg["sweep"]["transforms"].items():
                    for beta in betas:
                        add("qrpo", beta, seed, group, transform=transform)
        elif group == "baseline_beta":
            for method in METHODS[1:]:
                for beta in m[method]["betas"][1:]:
                    for seed in sweep_seeds:
                        add(method, beta, seed, group)
        elif group == "frontier":
            # Seed-major, so that a partial run has every curve at the first seed; within a seed the comparison the
            # profile exists for first (QRPO pointwise, when the pointwise group is planned, and DPO on the pairs of
            # the same samples), then QRPO on pairs, REBEL, and SimPO (no reference model) last.
            for seed in seeds:
                if "pointwise" in cfg["groups"]:
                    for beta in cfg["frontier_sweep"]["pointwise_betas"]:
                        add("qrpo", beta, seed, "pointwise", data="pointwise")
                for method in ("dpo", "qrpo", "rebel", "simpo"):
                    for beta in cfg["frontier_sweep"]["betas"][method]:
                        add(method, beta, seed, group)
        elif group == "pointwise":
            for seed in seeds:
                for beta in cfg["frontier_sweep"]["pointwise_betas"]:
                    add("qrpo", beta, seed, group, data="pointwise")
            for beta in cfg["frontier_sweep"]["betas"]["dpo"]:
                for seed in seeds:
                    add("dpo", beta, seed, group)
        else:
            raise ValueError(f"Unknown run group {group!r}.")
    return specs


def busy_cores_of_others(interval: float = 1.0) -> float:
    """Cores that other processes keep busy now: the machine's busy CPU time over `interval` seconds (/proc/stat)
    minus this process's own. The 1-minute load average lags by minutes (a set-up that just finished still counts);
    it is the fallback where /proc/stat is missing."""
    try:

        def busy() -> float:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
            return (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)) / os.sysconf("SC_CLK_TCK")

        machine, own = busy(), time.process_time()
        time.sleep(interval)
        return max(0.0, (busy() - machine - (time.process_time() - own)) / interval)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]


def set_threads(setting) -> int:
    """torch threads: an int, or "auto": every core when nothing else runs, else 1 (OpenMP threads that wait for a
    busy core slow every operation down several times); "auto" measures what other processes use now
    (`busy_cores_of_others`), not the load average, which lags by minutes."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if setting in (None, "default"):
        return torch.get_num_threads()
    if setting == "auto":
        n = cores if busy_cores_of_others() < 0.5 else 1
    else:
        n = int(setting)
    torch.set_num_threads(n)
    return n


def train_policy(spec: dict, cfg: dict, pairs, model_path: str, out_dir: Path, pointwise=None):
    """Train one policy on the pairs (or, for `data="pointwise"`, on the pointwise rows); returns the trained model
    (LoRA merged), the tokenizer and the trainer's log history.

    Pointwise runs take as many optimizer steps as the pair runs (`max_steps` = `train_steps`) with as many sequences
    per step: 2 x `train.batch_size` rows, a pair being 2 sequences."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = cfg["train"]
    transformers.set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg["dtype"]))
    peft_config = None
    if t.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=t["lora"]["r"],
            lora_alpha=t["lora"]["alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    is_pointwise = spec.get("data", "pairs") == "pointwise"
    common = dict(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=2 * t["batch_size"] if is_pointwise else t["batch_size"],
        num_train_epochs=t["epochs"],
        max_steps=train_steps(cfg, len(pairs)) if is_pointwise else -1,
        learning_rate=float(t["learning_rate"]),
        lr_scheduler_type=t["lr_scheduler_type"],
        warmup_steps=float(t["warmup_ratio"]),
        max_length=t["max_length"],
        seed=spec["seed"],
        data_seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    columns = ["prompt", "chosen", "rejected"]
    method = spec["method"]
    if method in ("qrpo", "rebel"):
        from trl_qrpo import QRPOConfig as config_class
        from trl_qrpo import QRPOTrainer as trainer_class

        if method == "rebel":
            extra = {"loss_type": ["rebel"]}
        else:
            extra = {"transform": spec["transform"], "num_ref_rewards": spec["num_ref_rewards"], "ties": spec["ties"]}
        extra.update(beta=spec["beta"], precompute_ref_log_probs=True, precompute_ref_batch_size=16)
        columns += ["chosen_reward", "rejected_reward", "ref_rewards"]
        if is_pointwise:
            if method != "qrpo" or pointwise is None:
                raise ValueError(f"Pointwise data is for QRPO, with the pointwise rows: {spec}")
            columns = ["prompt", "completion", "reward", "ref_rewards"]
    elif method == "dpo":
        from trl import DPOConfig as config_class
        from trl import DPOTrainer as trainer_class

        extra = {"beta": spec["beta"], "precompute_ref_log_probs": True, "precompute_ref_batch_size": 16}
    elif method == "simpo":
        from trl.experimental.cpo import CPOConfig as config_class
        from trl.experimental.cpo import CPOTrainer as trainer_class

        extra = {"loss_type": "simpo", "beta": spec["beta"], "simpo_gamma": spec["gamma"], "cpo_alpha": 0.0}
    else:
        raise ValueError(method)
    trainer = trainer_class(
        model=model,
        args=config_class(**extra, **common),
        train_dataset=(pointwise if is_pointwise else pairs).select_columns(columns),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    history = trainer.state.log_history
    policy = trainer.model
    if hasattr(policy, "merge_and_unload"):
        policy = policy.merge_and_unload()
    policy.eval()
    del trainer
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    return policy, tokenizer, history


def evaluate(policy, ref_model, tokenizer, eval_ds, cfg: dict, seed: int):
    from trl_qrpo.precompute import EvaluateConfig, evaluate_policy

    e = cfg["eval"]
    args = EvaluateConfig(
        num_samples=e["num_samples"],
        max_new_tokens=e["max_new_tokens"],
        seed=seed,
        batch_size=e["batch_size"],
        logprob_batch_size=16,
        backend="transformers",
        device="cpu",
    )
    samples, summary = evaluate_policy(
        eval_ds,
        args,
        model=policy,
        ref_model=ref_model,
        processing_class=tokenizer,
        reward_funcs=[load_reward(cfg["reward"])],
    )
    return samples, summary


def spearman(x, y) -> float | None:
    import torch

    from trl_qrpo.metrics import spearman_correlation

    return spearman_correlation(
        torch.as_tensor(np.asarray(x, dtype=np.float64)), torch.as_tensor(np.asarray(y, dtype=np.float64))
    )


def sample_records(samples) -> list[dict]:
    from trl_qrpo.rewards import completion_text

    keep = ["row_index", "sample_index", "num_tokens", "truncated", "reward", "policy_logp", "ref_logp", "logratio"]
    cols = {k: samples[k] for k in keep if k in samples.column_names}
    texts = [completion_text(c) for c in samples["completion"]]
    return [dict({k: cols[k][i] for k in cols}, completion=texts[i]) for i in range(len(samples))]


def write_samples(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def fixed_sample_logratios(policy, tokenizer, eval_ds, ref_records: list[dict]) -> list[float]:
    """log pi/pi_ref of the policy on pi_ref's own evaluation samples (the same completions for every method)."""
    from trl_qrpo.precompute import sequence_logps
    from trl_qrpo.precompute.sampling import tokenize_prompt

    prompt_ids = [tokenize_prompt(tokenizer, row) for row in eval_ds]
    p_ids = [prompt_ids[r["row_index"]] for r in ref_records]
    c_ids = [r["completion_ids"] for r in ref_records]
    logps = sequence_logps(policy, p_ids, c_ids, pad_token_id=tokenizer.pad_token_id, batch_size=16)
    return [a - r["ref_logp"] for a, r in zip(logps, ref_records, strict=True)]


def summarize_run(records: list[dict], beta: float | None) -> dict:
    rewards = np.array([r["reward"] for r in records])
    lengths = np.array([r["num_tokens"] for r in records], dtype=np.float64)
    out = {
        "num_samples": len(records),
        "reward": float(rewards.mean()),
        "reward_stderr": float(rewards.std(ddof=1) / math.sqrt(len(rewards))),
        "length": float(lengths.mean()),
        "truncated_fraction": float(np.mean([r["truncated"] for r in records])),
        "positive_fraction": float((rewards > 0.05).mean()),
        "negative_fraction": float((rewards < -0.05).mean()),
        "reward_length_spearman": spearman(lengths, rewards),
    }
    if "logratio" in records[0]:
        logratio = np.array([r["logratio"] for r in records])
        out["kl"] = float(logratio.mean())
        out["kl_stderr"] = float(logratio.std(ddof=1) / math.sqrt(len(logratio)))
        # implicit reward beta * log(pi/pi_ref); Spearman is invariant to the positive factor beta
        out["length_bias_own_samples"] = spearman(lengths, logratio)
    return out


def stage_reference_eval(cfg: dict, work: Path, eval_ds, ref_model, tokenizer) -> None:
    for seed in cfg["eval"]["seeds"]:
        out = work / "eval" / f"reference-s{seed}"
        if (out / "result.json").exists():
            continue
        log(f"evaluating pi_ref, seed {seed}")
        start = time.time()
        samples, _ = evaluate(ref_model, ref_model, tokenizer, eval_ds, cfg, seed)
        records = sample_records(samples)
        for r, ids in zip(records, samples["completion_ids"], strict=True):
            r["completion_ids"] = ids
        write_samples(out / "samples.jsonl", records)
        summary = summarize_run(records, None)
        summary["kl"] = 0.0
        write_json(
            out / "result.json",
            {"method": "reference", "seed": seed, "eval": summary, "eval_seconds": time.time() - start},
        )


def stage_runs(
    cfg: dict, work: Path, pairs, eval_ds, model_path: str, ref_model, tokenizer, only: set | None, pointwise=None
) -> None:
    import torch

    specs = run_specs(cfg)
    todo = [s for s in specs if not (work / "runs" / run_id(s) / "result.json").exists()]
    if only:
        todo = [s for s in todo if only & set(s["groups"])]
    log(f"{len(specs)} runs in the plan, {len(todo)} to do")
    for i, spec in enumerate(todo, 1):
        rid = run_id(spec)
        out = work / "runs" / rid
        load = os.getloadavg()[0]
        threads = set_threads(cfg.get("threads"))
        log(f"run {i}/{len(todo)}: {rid} ({threads} thread{'s' if threads > 1 else ''}, load {load:.1f})")
        start, cpu_start = time.time(), time.process_time()
        policy, _, history = train_policy(spec, cfg, pairs, model_path, out, pointwise=pointwise)
        train_seconds = time.time() - start
        start = time.time()
        samples, _ = evaluate(policy, ref_model, tokenizer, eval_ds, cfg, spec["seed"])
        records = sample_records(samples)
        ref_records = read_samples(work / "eval" / f"reference-s{spec['seed']}" / "samples.jsonl")
        fixed = fixed_sample_logratios(policy, tokenizer, eval_ds, ref_records)
        summary = summarize_run(records, spec["beta"])
        summary["length_bias_reference_samples"] = spearman([r["num_tokens"] for r in ref_records], fixed)
        summary["kl_on_reference_samples"] = float(-np.mean(fixed))  # KL(pi_ref || pi) estimate, for reference
        eval_seconds = time.time() - start
        cpu_seconds = time.process_time() - cpu_start
        write_samples(out / "samples.jsonl", records)
        train_logs = [h for h in history if "loss" in h]
        final = history[-1] if history else {}
        is_pointwise = spec.get("data", "pairs") == "pointwise"
        sequences_per_step = 2 * cfg["train"]["batch_size"]  # a pair is 2 sequences; pointwise: 2 x batch rows
        write_json(
            out / "result.json",
            {
                "id": rid,
                **spec,
                "train": {
                    "steps": final.get("step") or (train_logs[-1]["step"] if train_logs else None),
                    "train_loss": final.get("train_loss"),
                    "data": "pointwise" if is_pointwise else "pairs",
                    "train_rows": len(pointwise) if is_pointwise else len(pairs),
                    "rows_per_step": sequences_per_step if is_pointwise else cfg["train"]["batch_size"],
                    "sequences_per_step": sequences_per_step,
                    "log_history": history,
                },
                "eval": summary,
                "train_seconds": train_seconds,
                "eval_seconds": eval_seconds,
                "cpu_seconds": cpu_seconds,
                "torch_threads": threads,
                "load_at_start": load,
            },
        )
        log(
            f"  {rid}: reward {summary['reward']:+.3f}  KL {summary['kl']:.2f}  length {summary['length']:.1f}  "
            f"(train {train_seconds:.0f} s, eval {eval_seconds:.0f} s, CPU {cpu_seconds:.0f} s)"
        )
        del policy
        gc.collect()
        torch.set_grad_enabled(True)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "config.yaml"))
    parser.add_argument("--quick", action="store_true", help="small version of the whole pipeline (smoke test)")
    parser.add_argument(
        "--comparison",
        action="store_true",
        help="the method comparison alone, with 16 references per prompt (about 30 minutes on 2 idle cores)",
    )
    parser.add_argument(
        "--frontier",
        action="store_true",
        help="the reward-KL frontiers: 4 methods x 5 betas x 2 seeds, and QRPO pointwise on all samples "
        "(about 2 h 20 min on 2 idle cores, measured)",
    )
    parser.add_argument("--model", default=None, help="override the config's model (a folder, or 'smollm2')")
    parser.add_argument("--work_dir", default=None, help="override the config's work_dir")
    parser.add_argument("--results_dir", default=None, help="override the config's results_dir")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated run groups to do now (of the config's `groups`): main, qrpo_beta, num_ref_rewards, "
        "transform, baseline_beta, frontier, pointwise",
    )
    parser.add_argument("--report_only", action="store_true", help="only rebuild tables and plots from finished runs")
    parser.add_argument("--until", choices=["pairs", "reference"], default=None, help="stop after this stage")
    parser.add_argument("--set", action="append", default=[], help="override a config entry, e.g. train.epochs=1")
    args = parser.parse_args(argv)

    chosen = [name for name in PROFILES if getattr(args, name)]
    if len(chosen) > 1:
        parser.error(f"{' and '.join('--' + c for c in chosen)} are different profiles; choose one.")
    profile = chosen[0] if chosen else None
    cfg = load_config(args.config, profile, args.set)
    for key in ("model", "work_dir", "results_dir"):
        if getattr(args, key):
            cfg[key] = getattr(args, key) if key == "model" else str(Path(getattr(args, key)).resolve())
    work, results = Path(cfg["work_dir"]), Path(cfg["results_dir"])
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "config.json", cfg)

    from report import build_report

    if args.report_only:
        build_report(cfg, work, results)
        return 0

    import torch

    timing_path = work / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}

    def timed(name, fn, *a):
        if name in ("references", "reference_eval"):
            set_threads(cfg.get("threads"))
        start, cpu_start = time.time(), time.process_time()
        result = fn(*a)
        timing[name] = timing.get(name, 0.0) + time.time() - start
        timing[f"{name}_cpu"] = timing.get(f"{name}_cpu", 0.0) + time.process_time() - cpu_start
        write_json(timing_path, timing)
        return result

    wall = time.time()
    log(f"config {args.config}{f' (--{profile})' if profile else ''}; work_dir {work}")
    model_path = timed("model", resolve_model, cfg["model"])
    train, eval_ds = timed("split", stage_split, cfg, work)
    log(f"{len(train)} train prompts, {len(eval_ds)} eval prompts; model {model_path}")
    refs = timed("references", stage_references, cfg, work, train, model_path)
    scored = timed("score", stage_score, cfg, work, refs)
    pairs = timed("pairs", stage_pairs, cfg, work, scored)
    log(f"{len(pairs)} training pairs; data statistics in {work / 'data_stats.json'}")
    pointwise = None
    if any(s.get("data") == "pointwise" for s in run_specs(cfg)):
        pointwise = timed("pointwise", stage_pointwise, cfg, work, scored, pairs)
        log(f"{len(pointwise)} pointwise rows ({cfg['references']['num_candidates']} per prompt)")
    if args.until == "pairs":
        return 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ref_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg["dtype"])).eval()
    timed("reference_eval", stage_reference_eval, cfg, work, eval_ds, ref_model, tokenizer)
    if args.until == "reference":
        return 0
    only = set(args.only.split(",")) if args.only else None
    timed("runs", stage_runs, cfg, work, pairs, eval_ds, model_path, ref_model, tokenizer, only, pointwise)
    timed("report", build_report, cfg, work, results)
    timing["last_invocation_wall_seconds"] = time.time() - wall
    timing["last_invocation_cpu_seconds"] = time.process_time()
    write_json(timing_path, timing)
    log(f"done in {time.time() - wall:.0f} s; results in {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
