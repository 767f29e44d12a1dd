"""Off-policy training rows made from the reference completions themselves, as in the QRPO paper.

Each training row is one (or a pair) of the prompt's reference completions. Its quantile must be taken against the
*other* references (leave-one-out): the row keeps its own reward inside `ref_rewards` and is marked
`in_ref_rewards=True` (or `chosen_in_ref_rewards` / `rejected_in_ref_rewards`), and the trainer removes one entry
equal to the row's reward before computing the quantile; the discrete partition mode then uses K = {1..n}. No
quantile is computed here.

Order of each row's `ref_rewards`: the row's own reward(s) first, then the references that were not candidates for
selection, then the other candidates. A trainer that keeps only the first m reference rewards
(`num_ref_rewards`) therefore still finds the row's own reward, and compares the row with references whose choice
did not depend on it (the best of 6 candidates would otherwise be ranked against the 5 it beat).
"""

from __future__ import annotations

import math

import numpy as np

from ..columns import (
    COMPLETION_AND_REFERENCE_COLUMNS,
    PAIRED_SIDES,
    POINTWISE_SIDES,
    PROMPT,
    REF_COMPLETION_IDS,
    REF_COMPLETIONS,
    REF_LOGPS,
    REF_INDEX,
    REF_REWARDS,
    REF_TRUNCATED,
    TRUNCATED,
    ids_column,
    in_refs_column,
    ref_logp_column,
    reward_column,
    side_column,
)
from .config import BuildOffPolicyConfig
from .io import ensure_prompt_column, logger, require_columns
from .samples import sample_seed

OFFPOLICY_MODES = ("pointwise", "best_worst", "random_pairs")


def _ordered_refs(rewards: list[float], own: list[int], candidates: list[int]) -> list[float]:
    """Own reward(s) first, then non-candidates, then the other candidates (each group in original order)."""
    candidate_set = set(candidates)
    rest = [j for j in range(len(rewards)) if j not in candidate_set]
    others = [j for j in candidates if j not in own]
    return [rewards[j] for j in own + rest + others]


def build_offpolicy_dataset(dataset, args: BuildOffPolicyConfig | None = None):
    """Build QRPO training rows from the reference completions and their rewards.

    Args:
        dataset ([`~datasets.Dataset`]):
            Output of `generate_references` then `score_dataset`: `prompt`, `ref_completions`, `ref_rewards`
            (optionally `ref_truncated`, `ref_num_tokens`). Other columns (e.g. `tools`, `chat_template_kwargs`, ids)
            are copied to every row built from the prompt; the dataset's own completions and rewards are not.
        args ([`BuildOffPolicyConfig`], *optional*):
            The options (defaults: `BuildOffPolicyConfig()`):

            - `mode`: `"pointwise"`, one row per candidate reference (`prompt`, `completion`, `reward`,
              `ref_rewards`, `in_ref_rewards`); `"best_worst"`, one pair per prompt, the highest- and lowest-reward
              candidates (`prompt`, `chosen`, `rejected`, `chosen_reward`, `rejected_reward`, `ref_rewards`,
              `chosen_in_ref_rewards`, `rejected_in_ref_rewards`); `"random_pairs"`, one pair per prompt, two
              distinct candidates drawn at random (seeded per row), the higher reward as `chosen`.
            - `num_candidates`: use only the first `num_candidates` references as training completions (the paper:
              best and worst of the first 6). All references stay in `ref_rewards`. Default: all.
            - `seed`: seed of `"random_pairs"` (derived per row from the row index, so the result does not depend
              on sharding or order of processing).
            - `drop_ties`: in paired modes, drop pairs whose two rewards are equal (their count is logged). By
              default they are kept: every completion is its own regression example in QRPO, ties included.
            - `num_proc`: processes for `datasets.map`.

    Returns:
        [`~datasets.Dataset`]: training rows, plus `ref_index` (`chosen_ref_index`, `rejected_ref_index`): the
        reference each completion came from, `truncated` (`chosen_truncated`, `rejected_truncated`) when the
        input has `ref_truncated`, and from `generate`'s `ref_completion_ids` and `ref_logps` the sampled token ids
        (`completion_ids`, `chosen_ids`, `rejected_ids`) and pi_ref's log-probability (`ref_logp`,
        `chosen_ref_logp`, `rejected_ref_logp`) of each side: training uses those tokens as sampled and loads no
        reference model.
    """
    args = args if args is not None else BuildOffPolicyConfig()
    mode, num_candidates, seed, drop_ties, num_proc = (
        args.mode,
        args.num_candidates,
        args.seed,
        args.drop_ties,
        args.num_proc,
    )
    if mode not in OFFPOLICY_MODES:
        raise ValueError(f"mode must be one of {OFFPOLICY_MODES}, got {mode!r}.")
    dataset = ensure_prompt_column(dataset)
    require_columns(
        dataset,
        [REF_COMPLETIONS, REF_REWARDS],
        "Building off-policy rows",
        "Run `trl qrpo generate` and then `trl qrpo score` first.",
    )
    paired = mode != "pointwise"
    minimum = 2
    if num_candidates is not None and num_candidates < (2 if paired else 1):
        raise ValueError(
            f"num_candidates must be at least {2 if paired else 1} for mode {mode!r}, got {num_candidates}."
        )
    # The dataset's own completions, rewards and references are not carried over; other columns are.
    extra = [c for c in dataset.column_names if c not in COMPLETION_AND_REFERENCE_COLUMNS]
    has_truncated = REF_TRUNCATED in dataset.column_names
    has_ids = REF_COMPLETION_IDS in dataset.column_names
    has_logps = REF_LOGPS in dataset.column_names and all(
        logp is not None for row in dataset[REF_LOGPS] for logp in (row or [None])
    )
    if REF_LOGPS in dataset.column_names and not has_logps:
        logger.warning(
            f"Some '{REF_LOGPS}' are missing: the rows carry no reference log-probs, and training will use a reference "
            "model (or compute them with `trl qrpo ref-logps`)."
        )

    def build(batch, indices):
        out = {c: [] for c in [PROMPT, *extra]}
        sides = PAIRED_SIDES if paired else POINTWISE_SIDES
        for side in sides:
            out[side], out[reward_column(side)] = [], []
            out[in_refs_column(side)], out[side_column(side, REF_INDEX)] = [], []
            if has_truncated:
                out[side_column(side, TRUNCATED)] = []
            if has_ids:
                out[ids_column(side)] = []
            if has_logps:
                out[ref_logp_column(side)] = []
        out[REF_REWARDS] = []
        for pos, row in enumerate(indices):
            completions, rewards = batch[REF_COMPLETIONS][pos], batch[REF_REWARDS][pos]
            if completions is None or rewards is None or len(completions) != len(rewards):
                raise ValueError(
                    f"Row {row}: 'ref_completions' has {None if completions is None else len(completions)} entries "
                    f"but 'ref_rewards' has {None if rewards is None else len(rewards)}. Score the references again "
                    "(`trl qrpo score`) so that each has one reward."
                )
            if len(rewards) < minimum:
                raise ValueError(
                    f"Row {row} has {len(rewards)} reference(s); off-policy rows need at least {minimum} (the row's "
                    "own quantile is taken among the others). Generate more references (--num_generations)."
                )
            bad = [j for j, r in enumerate(rewards) if r is None or not math.isfinite(r)]
            if bad:
                raise ValueError(
                    f"Row {row}, column 'ref_rewards', reference {bad[0]}: reward {rewards[bad[0]]!r} is not a finite "
                    "number. Re-score the references or drop this row."
                )
            m = len(rewards) if num_candidates is None else min(num_candidates, len(rewards))
            candidates = list(range(m))
            if mode == "pointwise":
                picks = [[j] for j in candidates]
            elif mode == "best_worst":
                best = max(candidates, key=lambda j: (rewards[j], -j))
                worst = min(candidates, key=lambda j: (rewards[j], j))
                if worst == best:  # all candidates tie: any two distinct ones
                    worst = candidates[-1] if best != candidates[-1] else candidates[0]
                picks = [[best, worst]]
            else:
                rng = np.random.default_rng(sample_seed(seed, row))
                a, b = (int(x) for x in rng.choice(m, size=2, replace=False))
                picks = [[a, b] if rewards[a] >= rewards[b] else [b, a]]
            for own in picks:
                if paired and drop_ties and rewards[own[0]] == rewards[own[1]]:
                    continue
                out[PROMPT].append(batch[PROMPT][pos])
                for c in extra:
                    out[c].append(batch[c][pos])
                for side, j in zip(sides, own, strict=True):
                    out[side].append(completions[j])
                    out[reward_column(side)].append(float(rewards[j]))
                    out[in_refs_column(side)].append(True)
                    out[side_column(side, REF_INDEX)].append(j)
                    if has_truncated:
                        out[side_column(side, TRUNCATED)].append(bool(batch[REF_TRUNCATED][pos][j]))
                    if has_ids:
                        out[ids_column(side)].append(batch[REF_COMPLETION_IDS][pos][j])
                    if has_logps:
                        out[ref_logp_column(side)].append(batch[REF_LOGPS][pos][j])
                out[REF_REWARDS].append([float(r) for r in _ordered_refs(rewards, own, candidates)])
        return out

    kwargs = {"num_proc": num_proc} if num_proc else {}
    result = dataset.map(
        build,
        with_indices=True,
        batched=True,
        remove_columns=dataset.column_names,
        desc=f"Building off-policy rows ({mode})",
        **kwargs,
    )
    if paired and drop_ties and len(result) < len(dataset):
        logger.warning(f"drop_ties=True: {len(dataset) - len(result)} pair(s) with equal rewards were dropped.")
    logger.info(f"Built {len(result)} {mode} rows from {len(dataset)} prompts.")
    return result
