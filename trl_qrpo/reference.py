"""QRPO's pre-computation phase: reference completions, their rewards, off-policy rows, and policy evaluation.

The data flows one way, each step reading and writing a `datasets` dataset (a Hub id, a `save_to_disk` folder or a
data file), so a user can enter at any step::

    prompts --generate_references--> ref_completions --score_dataset--> rewards and ref_rewards
            --(build_offpolicy_dataset)--> QRPOTrainer --evaluate_policy--> reward, KL, length

- :func:`generate_references`: `num_generations` completions per prompt from the reference model (transformers
  `generate`, or vLLM), sampled from pi_ref unaltered by default, seeded per completion.
- :func:`score_dataset`: rewards of the dataset's completions (`reward`, or `chosen_reward`/`rejected_reward`) and
  of every reference (`ref_rewards`), from a reward model and/or reward functions.
- :func:`build_offpolicy_dataset`: training rows made from the references themselves (pointwise, best/worst pairs
  or random pairs), marked for leave-one-out.
- :func:`merge_shards`: concatenate the outputs of `num_shards` jobs.
- :func:`evaluate_policy`: reward, KL to pi_ref and length of a policy's own samples.

Long steps write finished chunks to `output_dir` as they go: run the same call again after a crash to resume.
"""

from .precompute.chunks import ShardPlan, merge_shards, read_manifest
from .precompute.evaluate import evaluate_policy, sequence_logps, summarize_evaluation
from .precompute.generate import generate_references
from .precompute.io import load_any_dataset, save_any_dataset
from .precompute.offpolicy import OFFPOLICY_MODES, build_offpolicy_dataset
from .precompute.sampling import sample_seed
from .precompute.scoring import (
    CombinedScorer,
    RewardFunctionScorer,
    RewardModelScorer,
    load_reward_function,
    make_scorer,
    score_dataset,
)

__all__ = [
    "OFFPOLICY_MODES",
    "CombinedScorer",
    "RewardFunctionScorer",
    "RewardModelScorer",
    "ShardPlan",
    "build_offpolicy_dataset",
    "evaluate_policy",
    "generate_references",
    "load_any_dataset",
    "load_reward_function",
    "make_scorer",
    "merge_shards",
    "read_manifest",
    "sample_seed",
    "save_any_dataset",
    "score_dataset",
    "sequence_logps",
    "summarize_evaluation",
]
