"""QRPOConfig on its own: CPU defaults, DPO fields QRPO refuses (and says so in --help), the transform checked early."""

import dataclasses
import math
import random
import typing

import pytest
import torch
from datasets import Dataset

from trl_qrpo import QRPOConfig, QRPOTrainer, register_transform
from trl_qrpo import config as config_module
from trl_qrpo.transforms import list_transforms

# DPOConfig fields (beyond TrainingArguments') that QRPO uses as DPO does.
USED_DPO_FIELDS = {
    "learning_rate",
    "model_init_kwargs",
    "trust_remote_code",
    "router_aux_loss_coef",
    "disable_dropout",
    "dataset_num_proc",
    "max_length",
    "truncation_mode",
    "padding_free",
    "pad_to_multiple_of",
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "loss_type",  # QRPO's own values
    "beta",  # QRPO's own default
    "activation_offloading",
    "pad_token",
}
REFUSED = ["loss_weights", "ld_alpha", "f_divergence_type", "label_smoothing", "use_weighting", "sync_ref_model"]
UNUSED = ["f_alpha_divergence_coef", "discopop_tau", "ref_model_mixup_alpha", "ref_model_sync_steps"]
# A value other than DPO's default for each.
NON_DEFAULT = {
    "loss_weights": [1.0],
    "ld_alpha": 0.5,
    "f_divergence_type": "forward_kl",
    "label_smoothing": 0.1,
    "use_weighting": True,
    "sync_ref_model": True,
    "f_alpha_divergence_coef": 0.3,
    "discopop_tau": 0.1,
    "ref_model_mixup_alpha": 0.9,
    "ref_model_sync_steps": 64,
}


def make_config(tmp_path, **kwargs):
    return QRPOConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def pointwise_rows(n=4, seed=0):
    rng = random.Random(seed)
    words = ["happy", "good", "day", "sky", "blue", "sad", "bad", "dog"]
    return [
        {
            "prompt": f"Tell me about {rng.choice(words)} {i}:",
            "completion": " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 5))),
            "reward": rng.gauss(0, 1),
            "ref_rewards": [rng.gauss(0, 1) for _ in range(4)],
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------------------------- bf16 default


def test_defaults_train_on_a_cpu(tiny_model_dir, tmp_path):
    """A QRPOConfig with DPOConfig's defaults otherwise (gradient checkpointing, batch size 8, ...) trains on CPU."""
    assert not torch.cuda.is_available()  # this machine; the rule for accelerators is tested below
    args = make_config(tmp_path, max_steps=1, logging_steps=1, save_strategy="no")
    assert args.bf16 is False and args.use_cpu is False
    trainer = QRPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=Dataset.from_list(pointwise_rows()))
    trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_explicit_bf16_is_respected(tmp_path):
    assert make_config(tmp_path, bf16=False).bf16 is False
    assert make_config(tmp_path, bf16=True, use_cpu=True).bf16 is True  # CPU autocast, asked for
    assert make_config(tmp_path, use_cpu=True).bf16 is False  # not asked for: fp32 on CPU
    with pytest.raises(ValueError, match="doesn't support bf16"):  # transformers' own error, as with DPOConfig
        make_config(tmp_path, bf16=True)
    assert make_config(tmp_path, fp16=False, bf16=False).fp16 is False


@pytest.mark.parametrize(
    "bf16_device, xla, use_cpu, env_cpu, expected",
    [
        (True, False, False, False, True),  # CUDA with bf16 (Ampere+), XPU, NPU, HPU, MPS on macOS 14+
        (False, True, False, False, True),  # TPU / XLA
        (False, False, False, False, False),  # a CPU, or a GPU without bf16
        (True, False, True, False, False),  # use_cpu on a GPU machine: fp32
        (True, False, False, True, False),  # accelerate launch --cpu (ACCELERATE_USE_CPU)
    ],
)
def test_bf16_default_rule(monkeypatch, bf16_device, xla, use_cpu, env_cpu, expected):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: bf16_device)
    monkeypatch.setattr(transformers.utils, "is_torch_xla_available", lambda: xla)
    if env_cpu:
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    else:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert config_module._accelerator_supports_bf16(use_cpu) is expected


def test_bf16_default_is_documented():
    assert "bf16" in QRPOConfig.__doc__.split("Defaults that differ")[1]
    help_text = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(QRPOConfig)}["bf16"]
    assert "accelerator that supports bf16" in help_text and "CPU" in help_text


# -------------------------------------------------------------------------------------- DPO fields QRPO refuses


def test_every_dpo_only_field_is_used_or_refused():
    """A DPOConfig field QRPO does not use must say so (this fails when TRL adds one)."""
    from transformers import TrainingArguments
    from trl import DPOConfig

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    dpo_only = {f.name for f in dataclasses.fields(DPOConfig)} - base
    assert dpo_only - USED_DPO_FIELDS == set(REFUSED + UNUSED)


@pytest.mark.parametrize("name", REFUSED + UNUSED)
def test_refused_fields_keep_dpo_type_and_default(name):
    from trl import DPOConfig

    ours = {f.name: f for f in dataclasses.fields(QRPOConfig)}[name]
    theirs = {f.name: f for f in dataclasses.fields(DPOConfig)}[name]
    assert ours.default == theirs.default and ours.default_factory == theirs.default_factory
    ours_type = typing.get_type_hints(QRPOConfig)[name]
    theirs_type = typing.get_type_hints(DPOConfig)[name]
    assert ours_type == theirs_type


def _help_of(help_text: str, name: str) -> str:
    """The help entry of `--name` in argparse's output (its option line and the indented text under it), flattened."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  --{name} "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
    option, text = lines[start], " ".join(" ".join(lines[start + 1 : end]).split())
    if "  " in option.strip():  # a short option line: argparse puts the help on the same line
        option, _, first = option.strip().partition("  ")
        text = f"{first.strip()} {text}".strip()
    return text


@pytest.mark.parametrize("name", REFUSED + UNUSED)
def test_help_says_qrpo_refuses_them(name):
    from trl import TrlParser

    entry = _help_of(TrlParser([QRPOConfig]).format_help(), name)
    word = "Refused by QRPO" if name in REFUSED else "Unused by QRPO, which refuses a value other than the default"
    assert entry.startswith(word), entry  # the first words of its help


@pytest.mark.parametrize("name", REFUSED + UNUSED)
def test_refused_fields_raise_naming_the_field(tmp_path, name):
    make_config(tmp_path, bf16=False)  # their defaults pass
    with pytest.raises(ValueError, match=rf"`{name}`.*Remove it"):
        make_config(tmp_path, bf16=False, **{name: NON_DEFAULT[name]})


# ---------------------------------------------------------------------------------- transform checked when built


def test_unknown_transform_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError) as error:
        make_config(tmp_path, bf16=False, transform="idenity")
    message = str(error.value)
    assert "transform='idenity'" in message  # the field and the value
    for known in list_transforms():
        assert repr(known) in message  # the known names
    assert "register_transform" in message and "package.module:function" in message  # the fixes


def test_transform_import_paths_and_late_registrations(tmp_path):
    assert make_config(tmp_path, bf16=False, transform="torch:sqrt").transform == "torch:sqrt"
    with pytest.raises(ValueError, match="transform='math:sqrt'.*quadrature"):  # not a function of tensors
        make_config(tmp_path, bf16=False, transform="math:sqrt")
    with pytest.raises(ValueError, match="transform='no_such_module_xyz:f' is refused: Could not import"):
        make_config(tmp_path, bf16=False, transform="no_such_module_xyz:f")
    with pytest.raises(ValueError, match="transform='no_such_name_xyz'"):
        make_config(tmp_path, bf16=False, transform="no_such_name_xyz")
    register_transform("no_such_name_xyz", lambda q: q**3)  # registered before the config is built: accepted
    assert make_config(tmp_path, bf16=False, transform="no_such_name_xyz").transform == "no_such_name_xyz"


def test_bad_transform_parameters_name_transform_kwargs(tmp_path):
    args = make_config(tmp_path, bf16=False, transform="affine-normal-icdf", transform_kwargs='{"mu": 1, "sigma": 2}')
    assert args.transform_kwargs == {"mu": 1, "sigma": 2}
    with pytest.raises(ValueError, match=r"transform_kwargs=\{'mu': 1.0\} is refused: Invalid parameters"):
        make_config(tmp_path, bf16=False, transform="identity", transform_kwargs={"mu": 1.0})


def test_a_transform_whose_log_z_quadrature_fails_is_refused_by_the_config(tmp_path):
    register_transform("plain-ndtri", torch.special.ndtri, clamp_low=True, clamp_high=True)
    for beta in (0.1, 1e-3):
        with pytest.raises(ValueError, match=rf"transform='plain-ndtri'.*beta={beta:g}.*log_partition"):
            make_config(tmp_path, bf16=False, transform="plain-ndtri", beta=beta)
    # The discrete partition function is a finite sum: no quadrature, accepted.
    assert make_config(tmp_path, bf16=False, transform="plain-ndtri", beta=0.1, partition_mode="discrete")
    # With length-normalised beta the smallest per-completion beta is checked too.
    make_config(tmp_path, bf16=False, transform="plain-ndtri", beta=1.0)
    with pytest.raises(ValueError, match="normalize_beta_by_length"):
        make_config(tmp_path, bf16=False, transform="plain-ndtri", beta=1.0, normalize_beta_by_length=True)


# ------------------------------------------------------------------------------- the options of the data steps


def test_data_step_options_are_built_from_the_config(tmp_path):
    """Each data step gets one options object, built from the config's fields of the same names."""
    from trl_qrpo.data import QuantileOptions, TargetOptions

    args = make_config(tmp_path, bf16=False, transform="log", beta=0.05, num_ref_rewards=3, ties="random")
    targets = TargetOptions.from_args(args)
    assert (targets.transform.name, targets.beta, targets.partition_mode) == ("log", 0.05, "continuous")
    assert (targets.max_length, targets.truncation_mode) == (args.max_length, args.truncation_mode)
    assert targets.num_ref_rewards == 3 and targets.in_quantile_pass
    assert QuantileOptions.from_args(args) == QuantileOptions(3, "random", "both", "leave_one_out", args.seed)
