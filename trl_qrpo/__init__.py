"""Quantile Reward Policy Optimization (QRPO) for Hugging Face TRL.

QRPO (Matrenok, Moalla, Gulcehre, 2025, arXiv:2507.08068) learns from pointwise rewards offline: each reward is
turned into its quantile among rewards of the reference model's own completions for the same prompt, which makes
the partition function of the KL-regularised optimum known in closed form. Training is a regression of
``beta * log(pi / pi_ref)`` onto ``f(quantile) - beta * log Z``.

The trainer and its config import TRL (and torch); the math (`transforms`, `losses`) imports neither TRL nor any
trainer. Names are loaded lazily so that ``import trl_qrpo`` stays cheap for the command line.
"""

__version__ = "0.1.0"

_LAZY = {
    "QRPOConfig": "trl_qrpo.config",
    "QRPOTrainer": "trl_qrpo.trainer",
    "DataCollatorForQRPO": "trl_qrpo.collator",
    "Transform": "trl_qrpo.transforms",
    "get_transform": "trl_qrpo.transforms",
    "register_transform": "trl_qrpo.transforms",
    "list_transforms": "trl_qrpo.transforms",
    "quantile_rewards": "trl_qrpo.losses",
    "QuantileResult": "trl_qrpo.losses",
    "qrpo_loss": "trl_qrpo.losses",
    "qrpo_targets": "trl_qrpo.losses",
    "rebel_loss": "trl_qrpo.losses",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_qrpo' has no attribute {name!r}")


def __dir__():
    return __all__
