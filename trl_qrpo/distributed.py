"""Multi-process launches on machines without a GPU (CI, CPU clusters): make the processes form one group.

Called from QRPOConfig.__post_init__. Nothing here changes a run on a GPU node, a single-process run, or a run where
the user set `ddp_backend` or `use_cpu`.
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
        "QRPOConfig sets such runs up by itself when ddp_backend and use_cpu are left unset: DeepSpeed under "
        "`accelerate launch` (or `trl qrpo --accelerate_config ...`) gets ddp_backend='gloo', DDP gets use_cpu=True. "
        "Under torchrun with `deepspeed=<json>`, transformers does not pass ddp_backend on: launch with `accelerate "
        "launch --use_deepspeed --deepspeed_config_file <json>` instead. With ddp_backend set but use_cpu unset, "
        "DDP on CPUs needs use_cpu=True."
    )
