"""Environment defaults for runs that must not reach the network: the tests, the benchmarks, the experiment.

Call `use_offline_defaults()` before importing transformers, datasets or huggingface_hub (they read these variables
at import time). Values already set in the environment win, so a user can still opt back in.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "TQDM_DISABLE": "1",
}


def use_offline_defaults(**extra: str) -> None:
    """Set `OFFLINE_ENV` (and `extra`, e.g. ``TRANSFORMERS_VERBOSITY="error"``) where the variable is not set yet."""
    for name, value in {**OFFLINE_ENV, **extra}.items():
        os.environ.setdefault(name, value)
