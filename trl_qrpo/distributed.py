"""Multi-process launches on machines without a GPU (CI, CPU clusters): make the processes form one group.

Used by the launcher, not by QRPOConfig (building a config in Python changes nothing here): the training script
(`trl_qrpo/scripts/qrpo.py`, what `trl qrpo` starts) calls `apply_cpu_only_launch_defaults(parser)` before it parses
the flags into a QRPOConfig, and `check_every_launched_process_joined(args)` before it builds the trainer. A script of
one's own does the same, or sets `ddp_backend` / `use_cpu` itself. Nothing here changes a run on a GPU node, a
single-process run, or a run where the user set `ddp_backend` or `use_cpu`.
"""

from __future__ import annotations

import os


# accelerate's own checks, in the order its PartialState._prepare_backend tries them for a launched process.
_ACCELERATOR_CHECKS = (
    "is_torch_xla_available",
    "is_mlu_available",
    "is_sdaa_available",
    "is_musa_available",
    "is_npu_available",
    "is_hpu_available",
    "is_xpu_available",
    "is_neuron_available",
)


def _launched_processes() -> int:
    """WORLD_SIZE in a process started by torchrun, `accelerate launch` or deepspeed (they set LOCAL_RANK), else 1."""
    if "LOCAL_RANK" not in os.environ:
        return 1
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _has_accelerator() -> bool:
    """Whether accelerate finds a device (and so a communication backend) for a launched process."""
    import torch
    from accelerate import utils

    if torch.cuda.is_available():
        return True
    for name in _ACCELERATOR_CHECKS:
        check = getattr(utils, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # a broken vendor extension means no usable device of that kind
            continue
    return False


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


# Launch settings that `set_up_cpu_only_launch` reads, with their unset values.
_LAUNCH_FIELDS = {"ddp_backend": None, "use_cpu": False, "deepspeed": None, "fsdp": None}
_FALSE = ("false", "0", "no", "n", "f", "off", "none", "null", "")


def _explicit_launch_settings(argv: list[str]) -> dict:
    """The values of `_LAUNCH_FIELDS` given on the command line or in the `--config` YAML (the command line wins)."""
    found = {}
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        with open(argv[argv.index("--config") + 1]) as handle:
            config = yaml.safe_load(handle) or {}
        if isinstance(config, dict):
            found.update({name: config[name] for name in _LAUNCH_FIELDS if name in config})
    for i, token in enumerate(argv):
        flag, has_value, value = token.partition("=")
        name = flag[2:] if flag.startswith("--") else None
        if name not in _LAUNCH_FIELDS:
            continue
        if not has_value:
            following = argv[i + 1] if i + 1 < len(argv) else None
            value = following if following is not None and not following.startswith("-") else "true"
        found[name] = value
    settings = {}
    for name, value in found.items():
        if name == "use_cpu":
            settings[name] = str(value).strip().lower() not in _FALSE
        else:
            settings[name] = None if value is None or str(value).strip().lower() in _FALSE else value
    return settings


def cpu_only_launch_defaults(argv: list[str] | None = None) -> dict:
    """
    The defaults that make a multi-process launch without a GPU form one group, for the arguments `argv` (default
    `sys.argv[1:]`) of a launched process: `{"ddp_backend": "gloo"}` (DeepSpeed), `{"use_cpu": True}` (DDP) or `{}`
    (anything else; see `set_up_cpu_only_launch` for the rule). Values the user gave, on the command line or in the
    `--config` YAML, are read from `argv` and always win: a default is only proposed for a field left unset.
    """
    import sys
    from types import SimpleNamespace

    if _launched_processes() < 2:  # the common case, decided from the environment alone
        return {}
    argv = list(sys.argv[1:] if argv is None else argv)
    args = SimpleNamespace(**{**_LAUNCH_FIELDS, **_explicit_launch_settings(argv)})
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
