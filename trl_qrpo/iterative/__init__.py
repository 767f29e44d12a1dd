"""Iterative QRPO: rounds of generate, score, train and evaluate, each round's policy the next round's reference.

    from trl_qrpo.iterative import IterateConfig, iterative_qrpo

    summary = iterative_qrpo(IterateConfig(model_name_or_path=..., dataset_name=..., output_dir=..., num_rounds=3,
                                           score={"reward_funcs": ["my_rewards.fn"]}, train={"beta": 0.05}))

On the command line: `trl qrpo iterate --config iterate.yaml` (recipes/iterative/). Modules: `config` (the options),
`plan` (which stage runs what: nothing runs there), `rows` (the run's own model-free stages: prompts, training rows,
anchoring), `run` (the stages in order, resumable), `summary` (table and plot). See docs/iterative.md.
"""

from .config import IterateConfig
from .plan import Stage, plan_stages
from .run import StageFailed, iterative_qrpo

__all__ = ["IterateConfig", "Stage", "StageFailed", "iterative_qrpo", "plan_stages"]
