"""Multi-process launches on machines without a GPU (CI, CPU clusters): make the processes form one group.

Used by the launcher, not by QRPOConfig (building a config in Python changes nothing here): the training script
(`trl_qrpo/scripts/qrpo.py`, what `trl qrpo` starts) calls `apply_cpu_only_launch_defaults(parser)` before it parses
the flags into a QRPOConfig, and `check_every_launched_process_joined(args)` before it builds the trainer. A script of
one's own does the same, or sets `ddp_backend` / `use_cpu` itself. Nothing here changes a run on a GPU node, a
single-process run, or a run where the user set `ddp_backend` or `use_cpu`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _launched_processes() -> int:
    """WORLD_SIZE in a process started by torchrun, `accelerate launch` or deepspeed (they set LOCAL_RANK), else 1."""
    if "LOCAL_RANK" not in os.environ:
        return 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _has_accelerator() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, NPU, MPS, ...): then accelerate finds a device and a backend."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def set_up_cpu_only_launch(args) -> None:
    """
    A multi-process launch without any GPU, with neither `ddp_backend` nor `use_cpu` set: choose what accelerate would
    choose on CPUs if it were asked, so that the processes form one group instead of each training alone.

    - DeepSpeed (`accelerate launch` with a DeepSpeed config): `ddp_backend="gloo"`. transformers hands it to
      accelerate, which otherwise counts 1 process while DeepSpeed, which finds its CPU accelerator and gloo by
      itself, counts all of them ("train_batch_size ... 2 != 2 * 1 * 2").
    - DDP (a multi-GPU accelerate config or torchrun): `use_cpu=True`, accelerate's multi-CPU mode over gloo.
      Without it each process trains a full copy of the model on the whole data set, silently.

    Not done from a launcher's own process (no LOCAL_RANK: `trl qrpo` parses the flags there; an explicit
    `ddp_backend` in a lone process makes accelerate ask for a process group that does not exist), nor with FSDP.

    `args` holds the launch settings before the config is built (the config sets accelerate's state up when it is
    built): see `cpu_only_launch_defaults`, which reads them from the command line and the YAML config.
    """
    launched = _launched_processes()
    if launched < 2 or args.ddp_backend is not None or args.use_cpu or _has_accelerator():
        return
    from transformers.utils import logging

    logger = logging.get_logger(__name__)
    deepspeed = bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if deepspeed:
        args.ddp_backend = "gloo"
        logger.warning(f"No GPU in this {launched}-process DeepSpeed launch: training on CPUs, ddp_backend='gloo'.")
    elif not fsdp:
        args.use_cpu = True
        logger.warning(f"No GPU in this {launched}-process launch: training on CPUs, DDP over gloo (use_cpu=True).")


def check_every_launched_process_joined(args) -> None:
    """Refuse a launch whose processes did not form one group: they would train separate copies, or fail later."""
    launched = _launched_processes()
    state = getattr(args, "distributed_state", None)
    if launched < 2 or state is None:
        return
    from accelerate.utils import DistributedType

    if state.num_processes == launched and state.distributed_type != DistributedType.NO:
        return
    raise ValueError(
        f"{launched} processes were launched (WORLD_SIZE={launched}), but accelerate set up {state.num_processes} "
        f"process(es) with distributed type {state.distributed_type.value}: each process would train alone on the "
        "whole data set, or DeepSpeed would fail its batch-size check. This happens on machines without a GPU. "
        "`trl qrpo` sets such runs up by itself when ddp_backend and use_cpu are left unset: DeepSpeed under "
        "`accelerate launch` (or `trl qrpo --accelerate_config ...`) gets ddp_backend='gloo', DDP gets use_cpu=True. "
        "In a script of your own, call trl_qrpo.distributed.apply_cpu_only_launch_defaults(parser) before parsing "
        "the flags into a QRPOConfig, or set those values yourself. "
        "Under torchrun with `deepspeed=<json>`, transformers does not pass ddp_backend on: launch with `accelerate "
        "launch --use_deepspeed --deepspeed_config_file <json>` instead. With ddp_backend set but use_cpu unset, "
        "DDP on CPUs needs use_cpu=True."
    )


@dataclass
class LaunchSettings:
    """The launch settings `set_up_cpu_only_launch` reads, with QRPOConfig's names and unset values."""

    ddp_backend: str | None = field(default=None, metadata={"help": "TrainingArguments.ddp_backend."})
    use_cpu: bool = field(default=False, metadata={"help": "TrainingArguments.use_cpu."})
    deepspeed: str | None = field(default=None, metadata={"help": "TrainingArguments.deepspeed."})
    fsdp: str | None = field(default=None, metadata={"help": "TrainingArguments.fsdp."})


def _given_launch_settings(argv: list[str]) -> LaunchSettings:
    """The launch settings given on the command line or in the `--config` YAML (the command line wins), parsed by
    TRL's own parser; every other flag is left alone."""
    from trl import TrlParser

    settings, _ = TrlParser(LaunchSettings).parse_args_and_config(args=argv, return_remaining_strings=True)
    for name in ("ddp_backend", "deepspeed", "fsdp"):  # YAML `fsdp: ""` / `false` mean unset, as for the trainer
        if str(getattr(settings, name)).strip().lower() in ("", "false", "none", "null", "no"):
            setattr(settings, name, None)
    return settings


def cpu_only_launch_defaults(argv: list[str] | None = None) -> dict:
    """
    The defaults that make a multi-process launch without a GPU form one group, for the arguments `argv` (default
    `sys.argv[1:]`) of a launched process: `{"ddp_backend": "gloo"}` (DeepSpeed), `{"use_cpu": True}` (DDP) or `{}`
    (anything else; see `set_up_cpu_only_launch` for the rule). Values the user gave, on the command line or in the
    `--config` YAML, are read from `argv` and always win: a default is only proposed for a field left unset.
    """
    import sys

    if _launched_processes() < 2:  # the common case, decided from the environment alone
        return {}
    args = _given_launch_settings(list(sys.argv[1:] if argv is None else argv))
    before = dict(vars(args))
    set_up_cpu_only_launch(args)
    return {name: value for name, value in vars(args).items() if value != before[name]}


def apply_cpu_only_launch_defaults(parser, argv: list[str] | None = None) -> dict:
    """Set `cpu_only_launch_defaults(argv)` as defaults of `parser` (an HfArgumentParser / TrlParser that parses a
    QRPOConfig); returns them. Call it before parsing: building the config sets accelerate's state up."""
    defaults = cpu_only_launch_defaults(argv)
    if defaults:
        parser.set_defaults(**defaults)
    return defaults
