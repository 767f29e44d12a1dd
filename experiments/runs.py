"""The experiment's runs: train each planned policy, evaluate it on the held-out prompts, write its result.

A run whose `result.json` exists is done and skipped, so a killed experiment continues where it stopped.
Methods: QRPO (trl_qrpo.QRPOTrainer), DPO (trl.DPOTrainer), SimPO (trl.experimental.cpo.CPOTrainer with
loss_type="simpo", cpo_alpha=0, gamma = gamma_beta_ratio x beta) and REBEL (QRPOTrainer with loss_type="rebel").
Every run evaluates fresh samples: reward, KL (mean sequence log-ratio of the policy's own samples), length, length
bias.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from config import ExperimentConfig
from plan import run_id, run_specs, selected_learning_rates, train_steps
from stages import load_reward

from trl_qrpo.metrics import spearman_correlation
from trl_qrpo.precompute.io import write_json


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


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


def train_policy(
    spec: dict, cfg: ExperimentConfig, pairs, model_path: str, out_dir: Path, pointwise=None, all_pairs=None
):
    """Train one policy on the pairs (or, for `data="pointwise"`, on the pointwise rows); returns the trained model
    (LoRA merged), the tokenizer and the trainer's log history.

    Pointwise runs take as many optimizer steps as the pair runs (`max_steps` = `train_steps`) with as many sequences
    per step: 2 x `train.batch_size` rows, a pair being 2 sequences."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype))
    peft_config = None
    if cfg.train_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.train_lora["r"],
            lora_alpha=cfg.train_lora["alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    data = spec.get("data", "pairs")
    is_pointwise = data == "pointwise"
    epochs = spec.get("epochs", cfg.train_epochs)
    paired = data in ("pairs", "all_pairs")
    common = dict(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=cfg.train_batch_size if paired else 2 * cfg.train_batch_size,
        num_train_epochs=epochs,
        # pointwise and powered runs: the pair runs' optimizer steps, whatever their data's size
        max_steps=train_steps(cfg, len(pairs), epochs) if is_pointwise or spec.get("fixed_steps") else -1,
        learning_rate=spec.get("learning_rate", cfg.train_learning_rate),
        lr_scheduler_type=cfg.train_lr_scheduler_type,
        warmup_steps=spec.get("warmup_ratio", cfg.train_warmup_ratio),
        max_length=cfg.train_max_length,
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
        precompute = spec.get("reference", "precomputed") == "precomputed"
        extra.update(beta=spec["beta"], precompute_ref_log_probs=precompute, precompute_ref_batch_size=16)
        columns += ["chosen_reward", "rejected_reward", "ref_rewards"]
        if is_pointwise:
            if method != "qrpo" or pointwise is None:
                raise ValueError(f"Pointwise data is for QRPO, with the pointwise rows: {spec}")
            columns = ["prompt", "completion", "reward", "ref_rewards"]
        elif data == "pair_sides":
            pointwise, is_pointwise = pair_sides(pairs), True
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
    if data == "all_pairs":
        if all_pairs is None:
            raise ValueError(f"data='all_pairs' needs the all-pairs rows: {spec}")
        train_data = all_pairs
    else:
        train_data = pointwise if is_pointwise else pairs
    trainer = trainer_class(
        model=model,
        args=config_class(**extra, **common),
        train_dataset=train_data.select_columns(columns),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if "residuals" in spec.get("groups", []):
        from residuals import attach_step_probe

        attach_step_probe(trainer)
    trainer.train()
    history = trainer.state.log_history
    policy = trainer.model
    if hasattr(policy, "merge_and_unload"):
        policy = policy.merge_and_unload()
    policy.eval()
    del trainer
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    return policy, tokenizer, history


def pair_sides(pairs):
    """Each side of each pair as its own pointwise row (its reward, the pair's independent references): the pairs'
    sequences and targets without the paired batch layout."""
    from datasets import Dataset

    rows = {"prompt": [], "completion": [], "reward": [], "ref_rewards": []}
    for row in pairs:
        for side in ("chosen", "rejected"):
            rows["prompt"].append(row["prompt"])
            rows["completion"].append(row[side])
            rows["reward"].append(row[f"{side}_reward"])
            rows["ref_rewards"].append(row["ref_rewards"])
    return Dataset.from_dict(rows)


def evaluate(policy, ref_model, tokenizer, eval_ds, cfg: ExperimentConfig, seed: int):
    from trl_qrpo.precompute import EvaluateConfig, evaluate_policy

    args = EvaluateConfig(
        num_samples=cfg.eval_num_samples,
        max_new_tokens=cfg.eval_max_new_tokens,
        seed=seed,
        batch_size=cfg.eval_batch_size,
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
        reward_funcs=[load_reward(cfg.reward)],
    )
    return samples, summary


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
    from trl_qrpo.logps import sequence_logps
    from trl_qrpo.tokenization import tokenize_prompt

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
        "reward_length_spearman": spearman_correlation(lengths, rewards),
    }
    if "logratio" in records[0]:
        logratio = np.array([r["logratio"] for r in records])
        out["kl"] = float(logratio.mean())
        out["kl_stderr"] = float(logratio.std(ddof=1) / math.sqrt(len(logratio)))
        # implicit reward beta * log(pi/pi_ref); Spearman is invariant to the positive factor beta
        out["length_bias_own_samples"] = spearman_correlation(lengths, logratio)
    return out


def stage_reference_eval(cfg: ExperimentConfig, work: Path, eval_ds, ref_model, tokenizer) -> None:
    for seed in cfg.eval_seeds:
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
    cfg: ExperimentConfig,
    work: Path,
    pairs,
    eval_ds,
    model_path: str,
    ref_model,
    tokenizer,
    only: set | None,
    pointwise=None,
    all_pairs=None,
    validation=None,
) -> None:
    """Train and evaluate every planned run not done yet. The plan is made again after each run: the `powered` group's
    runs appear once `lr_select` has picked their learning rate."""
    import torch

    def pending():
        specs = run_specs(cfg, selected_learning_rates(cfg, work))
        todo = [s for s in specs if not (work / "runs" / run_id(s) / "result.json").exists()]
        return specs, [s for s in todo if not only or only & set(s["groups"])]

    specs, todo = pending()
    log(f"{len(specs)} runs in the plan, {len(todo)} to do")
    i = 0
    while todo:
        spec, i = todo[0], i + 1
        rid = run_id(spec)
        out = work / "runs" / rid
        load = os.getloadavg()[0]
        threads = set_threads(cfg.threads)
        log(f"run {i}/{i - 1 + len(todo)}: {rid} ({threads} thread{'s' if threads > 1 else ''}, load {load:.1f})")
        start, cpu_start = time.time(), time.process_time()
        policy, _, history = train_policy(spec, cfg, pairs, model_path, out, pointwise=pointwise, all_pairs=all_pairs)
        train_seconds = time.time() - start
        start = time.time()
        on_validation = spec.get("eval_split", "eval") == "validation"
        if on_validation and validation is None:
            raise ValueError(f"{rid} is evaluated on validation prompts: set split_num_validation.")
        samples, _ = evaluate(
            policy, ref_model, tokenizer, validation if on_validation else eval_ds, cfg, spec["seed"]
        )
        records = sample_records(samples)
        summary = summarize_run(records, spec["beta"])
        if not on_validation:  # pi_ref's own samples exist for the evaluation prompts
            ref_records = read_samples(work / "eval" / f"reference-s{spec['seed']}" / "samples.jsonl")
            fixed = fixed_sample_logratios(policy, tokenizer, eval_ds, ref_records)
            summary["length_bias_reference_samples"] = spearman_correlation(
                [r["num_tokens"] for r in ref_records], fixed
            )
            summary["kl_on_reference_samples"] = float(-np.mean(fixed))  # KL(pi_ref || pi) estimate, for reference
        eval_seconds = time.time() - start
        cpu_seconds = time.process_time() - cpu_start
        write_samples(out / "samples.jsonl", records)
        train_logs = [h for h in history if "loss" in h]
        final = history[-1] if history else {}
        is_pointwise = spec.get("data", "pairs") not in ("pairs", "all_pairs")
        sequences_per_step = 2 * cfg.train_batch_size  # a pair is 2 sequences; pointwise: 2 x batch rows
        write_json(
            out / "result.json",
            {
                "id": rid,
                **spec,
                "train": {
                    "steps": final.get("step") or (train_logs[-1]["step"] if train_logs else None),
                    "train_loss": final.get("train_loss"),
                    "data": spec.get("data", "pairs"),
                    "train_rows": {
                        "pointwise": len(pointwise or []),
                        "pair_sides": 2 * len(pairs),
                        "all_pairs": len(all_pairs or []),
                    }.get(spec.get("data", "pairs"), len(pairs)),
                    "rows_per_step": sequences_per_step if is_pointwise else cfg.train_batch_size,
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
        specs, todo = pending()
