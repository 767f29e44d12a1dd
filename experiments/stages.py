"""The experiment's data, stage by stage; each stage skips the work its output folder already holds.

1. split       prompts file -> train / held-out eval prompts (seeded shuffle)
2. references  `num_candidates + num_ref_rewards` samples per train prompt from pi_ref (generate_references)
3. score       the reward of every reference (score_dataset)
4. pairs       best and worst of the first `num_candidates` references (build_offpolicy_dataset, "best_worst");
               the quantiles use the other `num_ref_rewards` references, which were not candidates
   pointwise   (only when a run needs it) every one of the first `num_candidates` references as its own row
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from config import ExperimentConfig

from trl_qrpo.metrics import spearman_correlation
from trl_qrpo.precompute.io import write_json


def load_reward(spec: str):
    """A reward function given as "module:function" (modules in experiments/ are importable)."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def as_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------------------------------------------
# Stages 1-4: data
# ----------------------------------------------------------------------------------------------------------------


def stage_split(cfg: ExperimentConfig, work: Path):
    from datasets import Dataset

    path = work / "prompts.json"
    if not path.exists():
        prompts = [line.strip() for line in open(cfg.prompts_file) if line.strip() and not line.startswith("#")]
        order = list(range(len(prompts)))
        random.Random(cfg.split_seed).shuffle(order)
        n_train, n_eval, n_val = cfg.split_num_train, cfg.split_num_eval, cfg.split_num_validation
        if n_train + n_eval + n_val > len(prompts):
            raise ValueError(
                f"{n_train} train + {n_eval} eval + {n_val} validation prompts requested, the file has {len(prompts)}."
            )
        split = {
            "train": [prompts[i] for i in order[:n_train]],
            "eval": [prompts[i] for i in order[n_train : n_train + n_eval]],
        }
        if n_val:  # after the eval prompts, so that adding a validation split leaves the other two as they were
            split["validation"] = [prompts[i] for i in order[n_train + n_eval : n_train + n_eval + n_val]]
        write_json(path, split)
    split = json.loads(path.read_text())
    train = Dataset.from_dict(
        {"prompt": [as_messages(p) for p in split["train"]], "prompt_index": list(range(len(split["train"])))}
    )
    evaluation = Dataset.from_dict({"prompt": [as_messages(p) for p in split["eval"]]})
    validation = (
        Dataset.from_dict({"prompt": [as_messages(p) for p in split["validation"]]}) if "validation" in split else None
    )
    return train, evaluation, validation


def stage_references(cfg: ExperimentConfig, work: Path, train, model_path: str):
    from trl_qrpo.precompute import GenerateConfig, generate_references

    return generate_references(
        train,
        GenerateConfig(
            model_name_or_path=model_path,
            num_generations=cfg.references_num_candidates + cfg.references_num_ref_rewards,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=cfg.references_max_new_tokens,
            seed=cfg.references_seed,
            batch_size=cfg.references_batch_size,
            chunk_size=cfg.references_chunk_size,
            backend="transformers",
            dtype=cfg.dtype,
            device="cpu",
            output_dir=str(work / "references"),
        ),
    )


def stage_score(cfg: ExperimentConfig, work: Path, refs):
    from trl_qrpo.precompute import ScoreConfig, score_dataset

    args = ScoreConfig(output_dir=str(work / "scored"), chunk_size=cfg.references_chunk_size)
    return score_dataset(refs, args, reward_funcs=[load_reward(cfg.reward)])


def stage_pairs(cfg: ExperimentConfig, work: Path, scored):
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
    C, N = cfg.references_num_candidates, cfg.references_num_ref_rewards
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


def stage_pointwise(cfg: ExperimentConfig, work: Path, scored, pairs):
    """Pointwise rows: each of the first C references of every prompt that has a training pair, with its own reward.

    The same samples the pairs were picked from (the pair = best and worst of them), so DPO on the pairs and QRPO
    on these rows see the same completions; QRPO sees all C of them, each alone with its reward, no pair. Quantiles
    among the same N independent references as the pairs (references C..C+N-1; `in_ref_rewards` = False).
    """
    from datasets import load_from_disk

    from trl_qrpo.precompute import BuildOffPolicyConfig, build_offpolicy_dataset

    path = work / "pointwise"
    C, N = cfg.references_num_candidates, cfg.references_num_ref_rewards
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


def stage_all_pairs(cfg: ExperimentConfig, work: Path, scored, pairs, count: int):
    """DPO's fair control: `count` pairs drawn (seeded, without replacement) from every pair of different rewards
    among the first C references of each prompt that has a training pair, the higher reward as chosen.

    The same samples and rewards QRPO pointwise trains on, used as fully as pairs allow (C (C - 1) / 2 pairs a prompt
    at most); `count` makes DPO see as many sequences as the other arms in the same steps."""
    from datasets import Dataset, load_from_disk

    path = work / "all_pairs"
    C = cfg.references_num_candidates
    if not (path / "dataset_info.json").exists():
        keep = set(pairs["prompt_index"])
        candidates = []
        for row in scored:
            if row["prompt_index"] not in keep:
                continue
            rewards = row["ref_rewards"][:C]
            for i in range(C):
                for j in range(C):
                    if rewards[i] > rewards[j]:
                        candidates.append((row["prompt_index"], i, j))
        if len(candidates) < count:
            raise ValueError(f"{len(candidates)} pairs of different rewards among the candidates, {count} wanted.")
        rng = np.random.default_rng(cfg.references_seed)
        picked = sorted(rng.choice(len(candidates), size=count, replace=False))
        by_index = {row["prompt_index"]: row for row in scored if row["prompt_index"] in keep}
        columns = {
            "prompt": [],
            "chosen": [],
            "rejected": [],
            "chosen_reward": [],
            "rejected_reward": [],
            "prompt_index": [],
        }
        for k in picked:
            p, i, j = candidates[k]
            row = by_index[p]
            columns["prompt"].append(row["prompt"])
            columns["chosen"].append(row["ref_completions"][i])
            columns["rejected"].append(row["ref_completions"][j])
            columns["chosen_reward"].append(row["ref_rewards"][i])
            columns["rejected_reward"].append(row["ref_rewards"][j])
            columns["prompt_index"].append(p)
        Dataset.from_dict(columns).save_to_disk(str(path))
        write_json(
            work / "all_pairs_stats.json",
            {"num_pairs": count, "available_pairs": len(candidates), "prompts": len(keep)},
        )
    return load_from_disk(str(path))


def data_stats(scored, pairs, C: int, N: int) -> dict:
    rewards = np.array(scored["ref_rewards"], dtype=np.float64)  # [prompts, C + N]
    lengths = np.array(scored["ref_num_tokens"], dtype=np.float64)
    truncated = np.array(scored["ref_truncated"], dtype=bool)

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
        "reference_reward_length_spearman": spearman_correlation(rewards.ravel(), lengths.ravel()),
        "chosen_reward_mean": float(chosen.mean()),
        "rejected_reward_mean": float(rejected.mean()),
        "chosen_quantile_mean": float(q_chosen.mean()),
        "rejected_quantile_mean": float(q_rejected.mean()),
    }
