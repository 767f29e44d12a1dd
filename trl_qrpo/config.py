"""QRPOConfig: DPOConfig plus QRPO's fields, so that a DPO script parses unchanged."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trl import DPOConfig

from .data import SAMPLE_SELECTORS, SELF_INCLUSION
from .losses import BASELINE_LOSS_TYPES, LOSS_TYPES, PARTITION_MODES, TIES


def _accelerator_supports_bf16(use_cpu: bool) -> bool:
    """Whether bf16 may default to on, decided by the libraries' own checks (nothing re-implemented here).

    False when the run is forced onto the CPU: ``use_cpu``, or ``ACCELERATE_USE_CPU`` read as accelerate reads it
    (``accelerate.utils.parse_flag_from_env``, which ``accelerate launch --cpu`` sets). Otherwise the check
    transformers' ``TrainingArguments`` makes before it accepts ``bf16=True`` without ``use_cpu``:
    ``transformers.utils.is_torch_bf16_gpu_available()`` (CUDA with bf16 support, XPU, NPU, HPU, MPS on macOS 14+, ...)
    or ``is_torch_xla_available()`` (TPU). Not ``accelerate.utils.is_bf16_available``: it answers True on a CPU.
    """
    from accelerate.utils import parse_flag_from_env
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    if use_cpu or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return False
    return bool(is_torch_bf16_gpu_available() or is_torch_xla_available())


def _accelerator_present(use_cpu: bool) -> bool:
    """Whether the run has an accelerator to pin memory for: PyTorch's own check (``torch.accelerator``, the one its
    DataLoader makes before it warns that pinned memory is unused), False when the run is forced onto the CPU."""
    import torch
    from accelerate.utils import parse_flag_from_env

    if use_cpu or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return False
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def _unused_by_qrpo(what: str) -> str:
    return f"Unused by QRPO, which refuses a value other than the default: {what}."


@dataclass
class QRPOConfig(DPOConfig):
    r"""
    Configuration class for the [`QRPOTrainer`].

    Subclasses [`~trl.DPOConfig`]: every DPO field still parses, so a DPO script or recipe ports by changing two
    names. The fields that would break QRPO's closed-form partition function or that assume a pairwise loss
    (`sync_ref_model`, `f_divergence_type` other than `"reverse_kl"`, `ld_alpha`, `use_weighting`, `loss_weights`,
    `label_smoothing`, a DPO `loss_type`) are refused with an error that says why, and so are non-default values of
    the DPO fields that only tune what QRPO refuses or a DPO loss it does not have (`f_alpha_divergence_coef`,
    `discopop_tau`, `ref_model_mixup_alpha`, `ref_model_sync_steps`): they would have no effect. `--help` says so
    for each of them.

    Building a QRPOConfig validates the transform (its name, import path or registration, its parameters, and for a
    continuous partition function that its log Z at `beta` can be computed exactly) before any model or data is
    loaded. It has no side effect beyond DPOConfig's own: multi-process launches on machines without a GPU are set
    up by the launcher (`trl qrpo`; see `trl_qrpo.distributed`), not by the config.

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
            added with [`register_transform`] before the config is built, or an import path
            `"package.module:function"` (log Z by quadrature). Checked when the config is built: an unknown name, an
            import path that does not import, or a plain function whose log Z the quadrature cannot compute to 1e-7
            at `beta` (such as Phi^-1 below beta 0.34) is an error.
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
        check_ref_logps (`int`, *optional*, defaults to `8`):
            When the rows carry pi_ref's log-probabilities (`ref_logp`, `chosen_ref_logp`, `rejected_ref_logp`, from
            `trl qrpo generate` or `trl qrpo ref-logps`; training then loads no reference model), recompute this
            many rows with the training forward at start and report the largest difference. `0` turns it off.
        ref_logps_tolerance (`float`, *optional*, defaults to `0.05`):
            The difference (nats per sequence) above which that check warns; `beta` times it is how far the regression
            target moves. fp32 engines agree with the training forward to about 1e-4 nats; bf16 engines differ more.

        > Parameters of TrainingArguments / DPOConfig whose default QRPO changes or which QRPO refuses

        bf16 (`bool`, *optional*):
            bf16 mixed precision. If not set: `True` when `fp16` is not set and the run uses an accelerator that
            supports bf16 (CUDA with bf16 support, i.e. Ampere or newer; XPU, NPU, HPU, MPS on macOS 14+, TPU), else
            `False` (a CPU, `use_cpu=True`, or `ACCELERATE_USE_CPU`). An explicit `bf16=True` on a machine without
            such an accelerator gets transformers' error, unless `use_cpu=True`.
        activation_checkpointing (`bool`, *optional*):
            Activation (gradient) checkpointing. If not set: `True`, TRL's default, set under transformers' current
            name. (TRL sets it through the deprecated alias `gradient_checkpointing`, which makes transformers warn at
            every config built, twice per `trl qrpo` run.) `gradient_checkpointing` still works, with transformers'
            deprecation warning.
        gradient_checkpointing (`bool`, *optional*):
            Deprecated alias of `activation_checkpointing` (transformers 5); not set by default.
        dataloader_pin_memory (`bool`, *optional*):
            Pinned memory for the data loader. If not set: `True` when the run uses an accelerator (PyTorch's
            `torch.accelerator`), else `False` (a CPU, `use_cpu`, `ACCELERATE_USE_CPU`), where pinning does nothing
            and PyTorch warns at every data loader that it is unused.
        loss_weights, ld_alpha, f_divergence_type, label_smoothing, use_weighting, sync_ref_model:
            Refused (any value other than DPO's default is an error): see each field's help.
        f_alpha_divergence_coef, discopop_tau, ref_model_mixup_alpha, ref_model_sync_steps:
            Unused by QRPO; a value other than DPO's default is refused.

    > [!NOTE]
    > Defaults that differ from [`~trl.DPOConfig`]: `beta` is `1e-3` instead of `0.1`, `loss_type` is `"mse"`, and
    > `bf16` is `True` only on an accelerator with bf16 support (DPOConfig: whenever `fp16` is not set, which fails on
    > a CPU with "Your setup doesn't support bf16/gpu"); `activation_checkpointing` is on by default as in TRL, but
    > set under its current name (no deprecation warning); `dataloader_pin_memory` is on only with an accelerator.
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
    check_ref_logps: int = field(
        default=8,
        metadata={
            "help": "When the rows carry reference log-probs (from `trl qrpo generate` or `ref-logps`), recompute "
            "this many rows with the training forward at start (no second model: before the first step the policy "
            "is the reference) and report the largest difference. 0 turns the check off."
        },
    )
    ref_logps_tolerance: float = field(
        default=0.05,
        metadata={
            "help": "Largest difference, in nats per sequence, between stored and recomputed reference log-probs "
            "before a warning (beta x the difference is how far the regression target moves). fp32 engines agree "
            "to ~1e-4; bf16 engines differ by more."
        },
    )

    # TrainingArguments / DPOConfig fields: a default that depends on the hardware, and DPO's fields QRPO refuses.
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Default (unset): True when fp16 is not set and the run uses an accelerator "
            "that supports bf16 (CUDA Ampere or newer, XPU, NPU, HPU, MPS on macOS 14+, TPU), else False (CPU, "
            "use_cpu, ACCELERATE_USE_CPU). An explicit True without such an accelerator is an error unless use_cpu."
        },
    )
    # TRL's base config defaults `gradient_checkpointing` (transformers 5's deprecated alias) to True, so that
    # transformers warns at every config built; QRPO leaves the alias unset and turns `activation_checkpointing` on
    # when neither is given (see __post_init__). `nargs`/`const` as transformers': a bare flag means True.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Activation (gradient) checkpointing: trades compute for memory (about 20%% slower steps). "
            "Default (unset): True, as TRL's trainers; set false for small models or on a CPU.",
            "nargs": "?",
            "const": True,
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing` (transformers 5 warns when it is used). Default: "
            "unset.",
            "nargs": "?",
            "const": True,
        },
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={
            "help": "Pin the data loader's memory (for copies to an accelerator). Default (unset): True when the run "
            "uses an accelerator, else False (a CPU, use_cpu, ACCELERATE_USE_CPU), where it does nothing."
        },
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Refused by QRPO (must stay unset): it weights several DPO loss types; QRPO has a single "
            "regression loss."
        },
    )
    ld_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Refused by QRPO (must stay unset): LD-DPO's weighting of the tokens past a chosen/rejected "
            "pair's shared length; QRPO trains each completion alone, and the weighting would break the exact log Z."
        },
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={
            "help": "Refused by QRPO unless 'reverse_kl' (the default): QRPO's closed-form partition function is "
            "that of the reverse-KL-regularised objective; f-DPO's other divergences have none."
        },
    )
    f_alpha_divergence_coef: float = field(
        default=0.5,
        metadata={
            "help": _unused_by_qrpo(
                "the alpha of f-DPO's alpha-divergence, which only applies with f_divergence_type='alpha_divergence' "
                "(refused)"
            )
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Refused by QRPO unless 0.0 (the default): Robust DPO's / EXO's smoothing of preference labels; "
            "QRPO has no preference labels (each completion has a reward)."
        },
    )
    use_weighting: bool = field(
        default=False,
        metadata={
            "help": "Refused by QRPO unless False (the default): WPO's weighting of preference pairs; QRPO has no "
            "pairwise loss, and reweighting completions would break the exact log Z."
        },
    )
    discopop_tau: float = field(
        default=0.05,
        metadata={"help": _unused_by_qrpo("the temperature of DPO's 'discopop' loss type, which QRPO does not have")},
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "Refused by QRPO unless False (the default): TR-DPO's updates of the reference model; the "
            "reference must stay the policy that produced the reference rewards, or the quantiles and the partition "
            "function no longer describe it."
        },
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={
            "help": _unused_by_qrpo("TR-DPO's mixing weight, which only applies with sync_ref_model=True (refused)")
        },
    )
    ref_model_sync_steps: int = field(
        default=512,
        metadata={
            "help": _unused_by_qrpo(
                "TR-DPO's synchronisation interval, which only applies with sync_ref_model=True (refused)"
            )
        },
    )

    # DPO fields QRPO refuses whenever they differ from DPO's default, with the reason given in the error.
    _REFUSED_DPO_FIELDS: ClassVar[dict[str, tuple[Any, str]]] = {
        "sync_ref_model": (
            False,
            (
                "the reference must stay the policy that produced the reference rewards, or the quantiles and the "
                "partition function no longer describe it"
            ),
        ),
        "f_divergence_type": (
            "reverse_kl",
            "QRPO's closed-form partition function is that of the reverse-KL-regularised objective",
        ),
        "ld_alpha": (None, "it reweights a chosen/rejected pair's tokens"),
        "use_weighting": (False, "WPO weighting is defined for preference pairs"),
        "loss_weights": (None, "QRPO has a single loss"),
        "label_smoothing": (0.0, "it applies to preference labels, which QRPO has none of"),
        "f_alpha_divergence_coef": (0.5, "it only tunes f_divergence_type='alpha_divergence', which QRPO refuses"),
        "discopop_tau": (0.05, "it only tunes DPO's 'discopop' loss type, which QRPO does not have"),
        "ref_model_mixup_alpha": (0.6, "it only tunes sync_ref_model=True, which QRPO refuses"),
        "ref_model_sync_steps": (512, "it only tunes sync_ref_model=True, which QRPO refuses"),
    }

    def __post_init__(self):
        if isinstance(self.transform_kwargs, str):
            import json

            self.transform_kwargs = json.loads(self.transform_kwargs)
        if self.bf16 is None:  # DPOConfig would make it `not fp16`, which fails on a CPU
            self.bf16 = not self.fp16 and _accelerator_supports_bf16(self.use_cpu)
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default, under the name transformers does not warn about
        if self.dataloader_pin_memory is None:  # pinned memory is for copies to an accelerator
            self.dataloader_pin_memory = _accelerator_present(self.use_cpu)
        super().__post_init__()
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
        if self.check_ref_logps < 0 or not self.ref_logps_tolerance > 0:
            raise ValueError(
                f"check_ref_logps must be >= 0 (0: no check) and ref_logps_tolerance > 0, got {self.check_ref_logps} "
                f"and {self.ref_logps_tolerance}."
            )
        if self.num_ref_rewards is not None and self.num_ref_rewards < 1:
            raise ValueError(f"num_ref_rewards must be at least 1, got {self.num_ref_rewards}.")
        for name, (default, reason) in self._REFUSED_DPO_FIELDS.items():
            value = getattr(self, name)
            if value != default:
                raise ValueError(
                    f"QRPO does not support `{name}` (got {value!r}; {reason}). Remove it from the config (QRPO "
                    f"accepts only DPO's default, {default!r})."
                )
        self._check_transform()

    def _check_transform(self) -> None:
        """Resolve the transform as the trainer will, so that a bad one fails before any model or data is loaded."""
        from .transforms import CallableTransform, get_transform, list_transforms

        name, params = self.transform, self.transform_kwargs or {}
        known = ", ".join(repr(n) for n in list_transforms())
        if isinstance(name, str) and ":" not in name and name not in list_transforms():
            raise ValueError(
                f"transform={name!r} is not a known transform. Known names: {known}. Set `transform` to one of them, "
                "register yours with trl_qrpo.register_transform(name, function_or_Transform) before building the "
                "QRPOConfig, or give an import path 'package.module:function'."
            )
        try:
            transform = get_transform(name, **params)
        except ValueError as e:
            field_name = "transform_kwargs" if params and "Invalid parameters" in str(e) else "transform"
            value = params if field_name == "transform_kwargs" else name
            raise ValueError(
                f"{field_name}={value!r} is refused: {e} Known transform names: {known}. Fix `{field_name}` (an "
                "import path 'package.module:function' must import from where training runs)."
            ) from e
        if self.partition_mode != "continuous" or transform.per_prompt:
            return  # the discrete log Z is a finite sum; per-prompt transforms get their parameters from the data
        betas = [self.beta]
        if self.normalize_beta_by_length and self.max_length:
            betas.append(self.beta / self.max_length)  # the smallest per-completion beta
        for beta in betas:
            try:
                log_z = transform.log_partition(beta)
            except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError/TypeError: the function itself failed
                kind = " (a plain function: log Z by quadrature)" if isinstance(transform, CallableTransform) else ""
                which = " (beta / max_length, normalize_beta_by_length)" if beta != self.beta else ""
                raise ValueError(f"transform={name!r}{kind} cannot be used at beta={beta:g}{which}: {e}") from e
            if not math.isfinite(float(log_z)):
                raise ValueError(
                    f"transform={name!r} has log Z = {log_z} at beta={beta:g}: its partition function must be "
                    "finite. Fix the transform's log_partition, or use another transform or beta."
                )
