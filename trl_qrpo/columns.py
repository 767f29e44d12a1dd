"""The column contract: every column name (and accepted alias) that the stages of trl-qrpo write and read.

The stages hand each other `datasets` datasets (see the data flow in the README):

    generate  writes REF_COMPLETIONS, REF_COMPLETION_IDS, REF_LOGPS, REF_TRUNCATED, REF_NUM_TOKENS (one entry per
              reference completion: its text, the token ids sampled, pi_ref's log-probability of them, ...)
    score     writes a reward per completion column (COMPLETION_REWARD_COLUMNS) and REF_REWARDS
    build-offpolicy writes training rows: a completion (or a pair) with IN_REF_REWARDS marks and REF_INDEX, and the
              sampled token ids (ids_column) and pi_ref log-probability (ref_logp_column) of each side
    ref-logps writes ref_logp_column(side) for every completion column of any dataset
    training  reads the pointwise or paired layout below (aliases accepted); preparation writes COMPLETIONS, REWARD,
              QUANTILE, NUM_REFS and IN_REFS, then PROMPT_IDS, COMPLETION_IDS and the PER_COMPLETION_FLOATS
    evaluate  writes one row per sample of the policy (ROW_INDEX, SAMPLE_INDEX, NUM_TOKENS, POLICY_LOGP, ...)

Every other module imports these names instead of spelling the strings: one place to read what a stage needs.
Nothing here imports torch, TRL or a trainer.
"""

from __future__ import annotations

PROMPT = "prompt"
COMPLETION = "completion"
CHOSEN = "chosen"
REJECTED = "rejected"

# The sides of the two training layouts: pointwise rows have one completion, paired rows two.
POINTWISE_SIDES = (COMPLETION,)
PAIRED_SIDES = (CHOSEN, REJECTED)
COMPLETION_COLUMNS = (COMPLETION, CHOSEN, REJECTED)

REWARD = "reward"
QUANTILE = "quantile"
IN_REF_REWARDS = "in_ref_rewards"
REF_INDEX = "ref_index"
TRUNCATED = "truncated"
COMPLETION_IDS = "completion_ids"
REF_LOGP = "ref_logp"


def side_column(side: str, base: str) -> str:
    """The column of `base` for one side: `reward` for a pointwise completion, `chosen_reward` for `chosen`."""
    return base if side == COMPLETION else f"{side}_{base}"


def ids_column(side: str) -> str:
    """The token ids of a side's completion as sampled: `completion_ids`, `chosen_ids`, `rejected_ids` (TRL's names)."""
    return COMPLETION_IDS if side == COMPLETION else f"{side}_ids"


def ref_logp_column(side: str) -> str:
    """pi_ref's log-probability of a side's completion: `ref_logp`, `chosen_ref_logp`, `rejected_ref_logp`."""
    return side_column(side, REF_LOGP)


def reward_column(side: str) -> str:
    return side_column(side, REWARD)


def quantile_column(side: str) -> str:
    return side_column(side, QUANTILE)


def in_refs_column(side: str) -> str:
    return side_column(side, IN_REF_REWARDS)


# Completion column -> the reward column `score` writes for it.
COMPLETION_REWARD_COLUMNS = {side: reward_column(side) for side in COMPLETION_COLUMNS}
QUANTILE_COLUMNS = tuple(quantile_column(side) for side in COMPLETION_COLUMNS)
IN_REFS_COLUMNS = tuple(in_refs_column(side) for side in COMPLETION_COLUMNS)
IDS_COLUMNS = tuple(ids_column(side) for side in COMPLETION_COLUMNS)
REF_LOGP_COLUMNS = tuple(ref_logp_column(side) for side in COMPLETION_COLUMNS)

# Reference completions of pi_ref (generate) and their rewards (score): one entry per reference.
REF_COMPLETIONS = "ref_completions"
REF_REWARDS = "ref_rewards"
REF_TRUNCATED = "ref_truncated"
REF_NUM_TOKENS = "ref_num_tokens"
REF_COMPLETION_IDS = "ref_completion_ids"
REF_LOGPS = "ref_logps"
REF_LIST_COLUMNS = (REF_COMPLETIONS, REF_REWARDS, REF_TRUNCATED, REF_NUM_TOKENS, REF_COMPLETION_IDS, REF_LOGPS)

# Conversational extras that DPOTrainer passes to the chat template.
TOOLS = "tools"
CHAT_TEMPLATE_KWARGS = "chat_template_kwargs"

# canonical name -> accepted aliases (TRL's UltraFeedback data uses score_chosen / score_rejected; the QRPO authors'
# data uses chosen_rewards / rejected_rewards and *_quantile_reward).
ALIASES = {
    REWARD: ("score", "rewards"),
    reward_column(CHOSEN): ("score_chosen", "chosen_rewards", "chosen_score"),
    reward_column(REJECTED): ("score_rejected", "rejected_rewards", "rejected_score"),
    REF_REWARDS: ("reference_rewards",),
    side_column(CHOSEN, "ref_logp"): ("ref_chosen_logps",),  # TRL's DPOTrainer names
    side_column(REJECTED, "ref_logp"): ("ref_rejected_logps",),
    QUANTILE: ("quantile_reward",),
    quantile_column(CHOSEN): ("chosen_quantile_reward", "chosen_quantile_rewards"),
    quantile_column(REJECTED): ("rejected_quantile_reward", "rejected_quantile_rewards"),
}

# Columns that describe a row's own completions and references: not passed to reward functions as keyword
# arguments, and not carried over when off-policy rows are built from the references.
COMPLETION_AND_REFERENCE_COLUMNS = frozenset(
    {
        PROMPT,
        *COMPLETION_COLUMNS,
        *COMPLETION_REWARD_COLUMNS.values(),
        *REF_LIST_COLUMNS,
        *IN_REFS_COLUMNS,
        *QUANTILE_COLUMNS,
        *IDS_COLUMNS,
        *REF_LOGP_COLUMNS,
    }
)

# Training: columns made by dataset preparation (one list entry per completion of the row), then tokenisation.
COMPLETIONS = "completions"
NUM_REFS = "num_refs"
IN_REFS = "in_refs"
PROMPT_IDS = "prompt_ids"
TARGET = "target"
BETA = "beta"
BETA_LOG_Z = "beta_log_z"
SAMPLED_IDS = "sampled_ids"  # during preparation: the sampled token ids of each completion (None: tokenise its text)
SEQUENCE_REF_LOGPS = "ref_sequence_logps"  # pi_ref log-probability of each sequence (stored, or computed once)
# Float fields a collated QRPO batch carries, one value per completion.
PER_COMPLETION_FLOATS = (TARGET, BETA, BETA_LOG_Z, QUANTILE, REWARD, SEQUENCE_REF_LOGPS)

# Evaluation: one row per sample of the policy.
ROW_INDEX = "row_index"
SAMPLE_INDEX = "sample_index"
NUM_TOKENS = "num_tokens"
POLICY_LOGP = "policy_logp"
LENGTH_CONTROLLED_REWARD = "length_controlled_reward"
LOGRATIO = "logratio"
