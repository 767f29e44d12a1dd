"""QRPOConfig: DPOConfig plus QRPO's fields, so that a DPO script parses unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig

from .data import SAMPLE_SELECTORS, SELF_INCLUSION
from .distributed import check_every_launched_process_joined, set_up_cpu_only_launch
from .losses import BASELINE_LOSS_TYPES, LOSS_TYPES, PARTITION_MODES, TIES


@dataclass
class QRPOConfig(DPOConfig):
    r"""
    Configuration class for the [`QRPOTrainer`].

    Subclasses [`~trl.DPOConfig`]: every DPO field still parses, so a DPO script or recipe ports by changing two
    names. The fields that would break QRPO's closed-form partition function or that assume a pairwise loss
    (`sync_ref_model`, `f_divergence_type` other than `"reverse_kl"`, `ld_alpha`, `use_weighting`, `loss_weights`,
    `label_smoothing`, a DPO `loss_type`) are refused with an error that says why.

    Parameters:
        > Parameters that control the QRPO objective

        beta (`float`, *optional*, defaults to `1e-3`):
            KL coefficient. The default is the middle of the authors' sweep for the identity transform on chat data
            ({3e-4, 1e-3, 3e-3}, 8B models). With the identity transform the target of `beta * logratio` spans
            about 1 (the quantile range), so `beta` sets how far, in nats, the policy may move: `1/beta`. Transforms
            with a wider range (normal-icdf) were run with larger values ({3e-2, 1e-1, 3e-1}).
        loss_type (`str`, *optional*, defaults to `"mse"`):
            `"mse"`: `(target - beta * logratio)^2`, the paper's; `"mae"`: `|target - beta * logratio|`. The
            baseline `"rebel"` (REBEL: `((r_c - r_r)/beta - (logratio_c - logratio_r))^2` over pairs, raw rewards, no
            quantiles) is there to compare with on the same data and trainer; it needs paired data with both sides.
        transform (`str`, *optional*, defaults to `"identity"`):
            Transform f applied to the quantile reward: `"identity"`, `"log"`, `"square"`, `"sqrt"`, `"normal-icdf"`,
            `"affine-normal-icdf"` (parameters `mu`, `sigma` in `transform_kwargs`), `"scaled-normal-icdf"`, any name
            added with [`register_transform`], or an import path `"package.module:function"` (log Z by quadrature).
        transform_kwargs (`dict`, *optional*):
            Parameters of the transform, e.g. `{"mu": 0.0, "sigma": 2.0}` for `"affine-normal-icdf"`.
        partition_mode (`str`, *optional*, defaults to `"continuous"`):
            `"continuous"`: `log Z` of `f(U)`, U uniform on [0, 1] (the paper's). `"discrete"`: the exact partition
            function of `f(q_hat)` for a quantile estimated from n reference rewards (uniform on {0, 1/n, ..., 1}),
            which differs noticeably for small n or small beta.
        num_ref_rewards (`int`, *optional*):
            Use only the first n reference rewards of each row (the authors train with 1 or 3 of 50 generated).
            `None` uses them all. Rows with fewer raise an error.
        ties (`str`, *optional*, defaults to `"le"`):
            How a reward equal to reference rewards is ranked: `"le"` counts ties as below (the paper's `<=`),
            `"midrank"` counts half of them, `"random"` a uniform share, which keeps quantiles exactly uniform for
            binary or quantised rewards.
        sample_selector (`str`, *optional*, defaults to `"both"`):
            For paired data, which completions become training examples: `"both"` (the paper's), `"chosen"`,
            `"rejected"`, or `"random"` (one side per pair, seeded by `seed`).
        self_inclusion (`str`, *optional*, defaults to `"leave_one_out"`):
            For rows marked `in_ref_rewards` (the completion is one of its own references): `"leave_one_out"` ranks
            it among the other references; `"keep"` counts its own reward (the discrete partition function then uses
            the support {1/n, ..., 1}).
        normalize_beta_by_length (`bool`, *optional*, defaults to `False`):
            Use `beta / completion_tokens` for each completion (log Z then computed per completion), as in the
            Apertus trainer.
        normalize_loss_by_length (`bool`, *optional*, defaults to `False`):
            Divide each completion's loss by its token count, as in the Apertus trainer.

    > [!NOTE]
    > Defaults that differ from [`~trl.DPOConfig`]: `beta` is `1e-3` instead of `0.1`, `loss_type` is `"mse"`.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["transform_kwargs"]

    beta: float = field(
        default=1e-3,
        metadata={
            "help": "KL coefficient. Default 1e-3: the middle of the authors' sweep {3e-4, 1e-3, 3e-3} for the "
            "identity transform on chat data; `beta * logratio` is regressed onto targets spanning about 1, so the "
            "policy may move about 1/beta nats."
        },
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["mse"],
        metadata={
            "help": "QRPO regression loss: `'mse'` (the paper's) or `'mae'`; or the pairwise baseline `'rebel'` "
            "(paired data, both sides), for comparisons."
        },
    )
    transform: str = field(
        default="identity",
        metadata={
            "help": "Transform of the quantile reward: 'identity', 'log', 'square', 'sqrt', 'normal-icdf', "
            "'affine-normal-icdf', 'scaled-normal-icdf', a name registered with `register_transform`, or an import "
            "path 'package.module:function' (log Z by quadrature)."
        },
    )
    transform_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": 'Parameters of the transform, e.g. \'{"mu": 0.0, "sigma": 2.0}\' for affine-normal-icdf.'},
    )
    partition_mode: str = field(
        default="continuous",
        metadata={
            "help": "'continuous': log Z of f(U) for a uniform quantile (the paper's). 'discrete': the exact log Z "
            "of f(q_hat) for a quantile estimated from n reference rewards."
        },
    )
    num_ref_rewards: int | None = field(
        default=None,
        metadata={"help": "Use the first n reference rewards of each row (None: all). Rows with fewer are an error."},
    )
    ties: str = field(
        default="le",
        metadata={
            "help": "Ranking of rewards tied with reference rewards: 'le' (the paper's <=), 'midrank', or 'random' "
            "(exactly uniform quantiles for binary or quantised rewards)."
        },
    )
    sample_selector: str = field(
        default="both",
        metadata={
            "help": "Paired data: train on 'both' sides (the paper's), 'chosen', 'rejected' or 'random' (one per "
            "pair)."
        },
    )
    self_inclusion: str = field(
        default="leave_one_out",
        metadata={
            "help": "Rows marked in_ref_rewards (their completion is one of the references): 'leave_one_out' ranks "
            "them among the other references; 'keep' counts their own reward."
        },
    )
    normalize_beta_by_length: bool = field(
        default=False,
        metadata={
            "help": "Use beta / completion_tokens per completion (log Z per completion), as in the Apertus trainer."
        },
    )
    normalize_loss_by_length: bool = field(
        default=False,
        metadata={"help": "Divide each completion's loss by its token count, as in the Apertus trainer."},
    )

    def __post_init__(self):
        if isinstance(self.transform_kwargs, str):
            import json

            self.transform_kwargs = json.loads(self.transform_kwargs)
        set_up_cpu_only_launch(self)
        super().__post_init__()
        check_every_launched_process_joined(self)
        loss_type = self.loss_type
        if len(loss_type) != 1 or loss_type[0] not in LOSS_TYPES + BASELINE_LOSS_TYPES:
            raise ValueError(
                f"QRPO's loss_type is one of {list(LOSS_TYPES)} (a regression loss), got {loss_type}. DPO loss types "
                "compare two completions and do not apply; remove loss_type from a ported DPO config. (The baseline "
                "'rebel' is also accepted, for comparisons.)"
            )
        if loss_type[0] == "rebel" and self.sample_selector != "both":
            raise ValueError("loss_type='rebel' compares the two sides of each pair: it needs sample_selector='both'.")
        choices = {
            "partition_mode": PARTITION_MODES,
            "ties": TIES,
            "sample_selector": SAMPLE_SELECTORS,
            "self_inclusion": SELF_INCLUSION,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}.")
        if self.num_ref_rewards is not None and self.num_ref_rewards < 1:
            raise ValueError(f"num_ref_rewards must be at least 1, got {self.num_ref_rewards}.")
        refused = {
            "sync_ref_model": (
                self.sync_ref_model,
                "the reference must stay the policy that produced the reference rewards, or the quantiles and the "
                "partition function no longer describe it",
            ),
            "f_divergence_type": (
                self.f_divergence_type != "reverse_kl",
                "QRPO's closed-form partition function is that of the reverse-KL-regularised objective",
            ),
            "ld_alpha": (self.ld_alpha is not None, "it reweights a chosen/rejected pair's tokens"),
            "use_weighting": (self.use_weighting, "WPO weighting is defined for preference pairs"),
            "loss_weights": (self.loss_weights is not None, "QRPO has a single loss"),
            "label_smoothing": (
                self.label_smoothing != 0.0,
                "it applies to preference labels, which QRPO has none of",
            ),
        }
        for name, (is_set, reason) in refused.items():
            if is_set:
                raise ValueError(f"QRPO does not support `{name}` ({reason}). Remove it from the config.")
