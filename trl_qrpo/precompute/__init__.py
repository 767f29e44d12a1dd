"""QRPO's pre-computation phase: reference completions, their rewards, off-policy rows, and policy evaluation.

The data flows one way, each step reading and writing a `datasets` dataset (a Hub id, a `save_to_disk` folder or a
data file), so a user can enter at any step::

    prompts --generate_references--> ref_completions --score_dataset--> rewards and ref_rewards
            --(build_offpolicy_dataset)--> QRPOTrainer --evaluate_policy--> reward, KL, length

- :func:`generate_references`: `num_generations` completions per prompt from the reference model (transformers
  `generate`, or vLLM), sampled from pi_ref unaltered by default, seeded per completion.
- :func:`score_dataset`: rewards of the dataset's completions (`reward`, or `chosen_reward`/`rejected_reward`) and
  of every reference (`ref_rewards`), from a reward model (transformers or vLLM) and/or reward functions.
- :func:`build_offpolicy_dataset`: training rows made from the references themselves (pointwise, best/worst pairs
  or random pairs), marked for leave-one-out.
- :func:`compute_ref_logps`: pi_ref's log-probability of every completion of any dataset, as training computes it,
  so that training needs no reference model (rows from `generate` carry them already).
- :func:`merge_shards`: concatenate the outputs of `num_shards` jobs.
- :func:`evaluate_policy`: reward, KL to pi_ref and length of a policy's own samples.

Each function takes the config dataclass of its command (:mod:`.config`: [`GenerateConfig`], [`ScoreConfig`],
[`BuildOffPolicyConfig`], [`EvaluateConfig`]), the same object `trl qrpo <command>` parses. Long steps write finished
chunks to `output_dir` as they go: run the same call again after a crash to resume.

Modules. The stages, each a command and a function, none importing another: `generate`, `scoring`, `offpolicy`,
`ref_logps`, `evaluate`. What they share, importing no stage: `config` (the options), `io` (writing datasets and JSON, small
checks), `chunks` (resumable, sharded runs; merging shards), `samples` (the sample record, seeds, stop tokens,
decoding), `model_loading` (models and tokenizers), `scorers` (reward model and reward functions), and the backends:
`backends` (which sampler and scorer a config asks for), `transformers_sampler`, `vllm_engine` (what the vLLM backends
share), `vllm_sampler`, `vllm_scorer`. Prompts are tokenised by :mod:`trl_qrpo.tokenization` and log-probabilities
computed by :mod:`trl_qrpo.logps`, as in training; column names come from :mod:`trl_qrpo.columns`, datasets are read
by :mod:`trl_qrpo.loading`.
"""

from ..loading import load_split
from ..logps import sequence_logps
from .backends import make_scorer
from .chunks import ShardPlan, merge_shards, read_manifest
from .config import (
    BuildOffPolicyConfig,
    DataArguments,
    EvaluateConfig,
    GenerateConfig,
    MergeConfig,
    RefLogpsConfig,
    ScoreConfig,
)
from .evaluate import evaluate_policy, summarize_evaluation
from .generate import generate_references
from .io import save_any_dataset
from .offpolicy import OFFPOLICY_MODES, build_offpolicy_dataset
from .ref_logps import compute_ref_logps
from .samples import sample_seed
from .scorers import CombinedScorer, RewardFunctionScorer, RewardModelScorer, load_reward_function
from .scoring import score_dataset

__all__ = [
    "OFFPOLICY_MODES",
    "BuildOffPolicyConfig",
    "CombinedScorer",
    "DataArguments",
    "EvaluateConfig",
    "GenerateConfig",
    "MergeConfig",
    "RefLogpsConfig",
    "RewardFunctionScorer",
    "RewardModelScorer",
    "ScoreConfig",
    "ShardPlan",
    "build_offpolicy_dataset",
    "compute_ref_logps",
    "evaluate_policy",
    "generate_references",
    "load_reward_function",
    "load_split",
    "make_scorer",
    "merge_shards",
    "read_manifest",
    "sample_seed",
    "save_any_dataset",
    "score_dataset",
    "sequence_logps",
    "summarize_evaluation",
]
