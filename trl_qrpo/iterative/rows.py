"""The run's own model-free stages: a round's prompts, and its training rows (built, and anchored when asked).

Training rows are built by `build_offpolicy_dataset` (the `build-offpolicy` command's function) from the round's
scored samples. Before that, the samples are checked to be the round's reference's own (generate's manifest records
the model that sampled them): a quantile is only exact among samples of the reference. Anchored rounds then take each
row's reference rewards from the starting model's round-0 samples of the same prompt, and drop the log-probs the
sampler recorded (they are the round's policy's, not the starting model's: `ref-logps` computes those next).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..columns import (
    PAIRED_SIDES,
    POINTWISE_SIDES,
    PROMPT,
    REF_INDEX,
    REF_REWARDS,
    in_refs_column,
    ref_logp_column,
    side_column,
)
from ..precompute.chunks import read_manifest

logger = logging.getLogger("trl_qrpo.iterative")

# The column that ties a row to its prompt in the prompt set (added to the prompts, carried through every stage).
PROMPT_INDEX = "iterate_prompt_index"


def write_prompts(options: dict) -> None:
    """The `prompts` stage: the prompt set's rows of this round, each with its index in the set, saved to disk."""
    from ..loading import load_split

    prompts = load_split(options["dataset_name"], options["dataset_config"], options["dataset_split"])
    if PROMPT_INDEX in prompts.column_names:
        raise ValueError(
            f"The prompts have a column '{PROMPT_INDEX}', which iterative QRPO adds itself: rename or remove it."
        )
    prompts = prompts.add_column(PROMPT_INDEX, list(range(len(prompts))))
    rows = options["rows"]
    if rows is not None:
        if rows[-1] >= len(prompts):
            raise ValueError(
                f"'{options['dataset_name']}' has {len(prompts)} prompts, but this round needs rows {rows[0]}-{rows[-1]} "
                "(prompts_per_round x num_rounds rows in all): lower prompts_per_round or num_rounds, or add prompts."
            )
        prompts = prompts.select(rows)
    prompts.save_to_disk(options["output_dir"])


def check_sampled_by(generate_dir: str, model: str, what: str) -> None:
    """Refuse samples that `model` did not draw: quantiles and log Z are exact only among the reference's own."""
    manifest = read_manifest(generate_dir) or {}
    sampled_by = (manifest.get("params") or {}).get("model")
    if sampled_by != str(model):
        raise ValueError(
            f"{what}: the samples in '{generate_dir}' were drawn by {sampled_by!r}, not by {str(model)!r}, the model "
            "their quantiles must be taken under. Quantiles among another model's samples are not uniform under the "
            "reference and log Z would be wrong. Delete the folder and run the same command again to resample."
        )


def anchor_rows(rows, anchor):
    """Rows of a round's samples, with the starting model's round-0 reference rewards of the same prompt.

    Each row's `ref_rewards` becomes the anchor's (all of them: the row's completion is not among them, so every
    `*in_ref_rewards` mark is False) and the sampler's log-probs (`ref_logp` and the like: the round's policy's) are
    removed, for `ref-logps` to compute them under the starting model.
    """
    by_index = {i: pos for pos, i in enumerate(anchor[PROMPT_INDEX])}
    anchor_prompts, anchor_rewards = anchor[PROMPT], anchor[REF_REWARDS]
    sides = [s for s in (*POINTWISE_SIDES, *PAIRED_SIDES) if s in rows.column_names]

    def attach(row, position):
        index = row[PROMPT_INDEX]
        if index not in by_index:
            raise ValueError(
                f"Training row {position} (prompt {index} of the prompt set) has no reference samples of the starting "
                "model: round 0 sampled references for every round's prompts. Was the prompt set changed after round "
                "0? Use the same dataset_name, or start a new output_dir."
            )
        pos = by_index[index]
        if anchor_prompts[pos] != row[PROMPT]:
            raise ValueError(
                f"Training row {position}: its prompt differs from prompt {index} that round 0 sampled references for: "
                "the prompt set changed since round 0. Use the same dataset_name, or start a new output_dir."
            )
        out = {REF_REWARDS: [float(r) for r in anchor_rewards[pos]]}
        out.update({in_refs_column(side): False for side in sides})
        return out

    sampler_columns = [
        c for side in sides for c in (ref_logp_column(side), side_column(side, REF_INDEX)) if c in rows.column_names
    ]
    rows = rows.remove_columns(sampler_columns)
    return rows.map(attach, with_indices=True, desc="Anchoring the rows to the starting model's references")


def build_round_rows(options: dict) -> None:
    """The `build-offpolicy` stage of a round: training rows from the round's scored samples, anchored when asked."""
    from datasets import load_from_disk

    from ..precompute import BuildOffPolicyConfig, build_offpolicy_dataset

    own = {"dataset_name", "output_dir", "sampled_by", "prompt_rows", "anchor"}
    sampled_by = options["sampled_by"]
    check_sampled_by(sampled_by["generate_dir"], sampled_by["model"], "This round's samples")
    scored = load_from_disk(options["dataset_name"])
    if options["prompt_rows"] is not None:
        keep = set(options["prompt_rows"])
        scored = scored.filter(lambda i: i in keep, input_columns=PROMPT_INDEX, desc="This round's prompts")
    rows = build_offpolicy_dataset(scored, BuildOffPolicyConfig(**{k: v for k, v in options.items() if k not in own}))
    anchor = options["anchor"]
    if anchor is not None:
        check_sampled_by(anchor["generate_dir"], anchor["model"], "The anchor's references")
        rows = anchor_rows(rows, load_from_disk(anchor["score_dir"]))
        logger.info(
            f"Anchored {len(rows)} rows: quantiles among the starting model's references of round 0 "
            f"({anchor['score_dir']})."
        )
    Path(options["output_dir"]).parent.mkdir(parents=True, exist_ok=True)
    rows.save_to_disk(options["output_dir"])
