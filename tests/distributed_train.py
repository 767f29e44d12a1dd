"""Train QRPO a few steps and write what happened to a JSON file: the helper that tests/test_distributed.py launches.

Runs alone (one process, also imported in-process by the tests) or under `accelerate launch` / `torchrun` (several
processes, DDP or DeepSpeed). Everything that is not a test option is a QRPOConfig flag, as in the training script:

    python tests/distributed_train.py --model DIR --data rows.jsonl --result out.json --output_dir out \
        --max_steps 4 --per_device_train_batch_size 4 [QRPOConfig flags]
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml --num_processes 2 --mixed_precision no \
        tests/distributed_train.py --model DIR --result out.json --output_dir out --per_device_train_batch_size 2 \
        --bf16 false [--precompute_ref_log_probs true] [--lora] [--ref_model] [--stop_after K] ...

A launch of several processes without a GPU is set up as `trl qrpo` sets it up (`parse` applies
`trl_qrpo.distributed.apply_cpu_only_launch_defaults` before the flags become a QRPOConfig).

Without --data it trains on `make_rows()`: 16 scored pairs (conversational, 5 reference rewards each), the same in
every process.

The result (written by the main process): the logged losses by step, and per process the peak resident memory
(ru_maxrss), the world size and distributed type seen by the trainer, whether it kept a reference model, and the
fraction of each model's parameters that the process holds (1.0 unless ZeRO-3 shards it).
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass, field


@dataclass
class TestOptions:
    model: str = field(metadata={"help": "Model folder (policy; also the reference with --ref_model)."})
    result: str = field(metadata={"help": "Where the main process writes the JSON result."})
    data: str | None = field(default=None, metadata={"help": "A .jsonl file of QRPO rows (default: make_rows())."})
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (r=4 on q_proj, v_proj)."})
    ref_model: bool = field(
        default=False, metadata={"help": "Pass a separate reference model (loaded from --model) to the trainer."}
    )
    stop_after: int | None = field(
        default=None, metadata={"help": "Stop after this step (saving a checkpoint there), as if the job were killed."}
    )


WORDS = "happy good day sky blue sad bad dog cat runs park bright great awful".split()


def make_rows(n: int = 16, seed: int = 0) -> list[dict]:
    """Scored conversational pairs with 5 reference rewards each, deterministic."""
    import random

    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Tell me {text(2)} {i}"}],
                "chosen": [{"role": "assistant", "content": text(rng.randint(1, 6))}],
                "rejected": [{"role": "assistant", "content": text(rng.randint(1, 6))}],
                "chosen_reward": rng.gauss(0.5, 1),
                "rejected_reward": rng.gauss(-0.5, 1),
                "ref_rewards": [rng.gauss(0, 1) for _ in range(5)],
            }
        )
    return rows


def write_rows(path, n: int = 16, seed: int = 0):
    with open(path, "w") as handle:
        for row in make_rows(n, seed):
            handle.write(json.dumps(row) + "\n")
    return path


def _rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _held_fraction(model) -> float | None:
    """Fraction of the model's parameter elements held by this process (ZeRO-3 keeps a 1/world_size shard)."""
    if model is None:
        return None
    total = held = 0
    for param in model.parameters():
        if hasattr(param, "ds_numel"):  # partitioned by ZeRO-3
            total += param.ds_numel
            held += param.ds_tensor.numel()
        else:
            total += param.numel()
            held += param.numel()
    return held / total


def train(options: TestOptions, args) -> dict:
    """Build and train a QRPOTrainer; returns the result (also written to `options.result` by the main process)."""
    import datasets
    from accelerate.utils import gather_object
    from transformers import AutoModelForCausalLM, TrainerCallback

    from trl_qrpo import QRPOTrainer

    class StopAfter(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if options.stop_after is not None and state.global_step >= options.stop_after:
                control.should_save = True
                control.should_training_stop = True
            return control

    with args.main_process_first(desc="loading the rows"):  # the main process fills the datasets cache first
        if options.data:
            dataset = datasets.load_dataset("json", data_files=options.data, split="train")
        else:
            dataset = datasets.Dataset.from_list(make_rows())
    peft_config = None
    if options.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    # Loaded after the config exists, so that ZeRO-3 builds it sharded (zero.Init), as the trainer builds the policy.
    ref_model = AutoModelForCausalLM.from_pretrained(options.model) if options.ref_model else None

    memory = {"rss_before_trainer_kib": _rss_kib()}
    trainer = QRPOTrainer(
        model=options.model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        peft_config=peft_config,
        callbacks=[StopAfter()],
    )
    memory["rss_after_init_kib"] = _rss_kib()
    memory["peak_after_init_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    memory["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    state = trainer.accelerator.state
    process = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.args.world_size,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(state.distributed_type),
        "deepspeed": trainer.is_deepspeed_enabled,
        "zero_stage": (
            state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled and state.deepspeed_plugin else None
        ),
        "has_ref_model": trainer.ref_model is not None,
        "precompute_engine_alive": getattr(trainer, "_precompute_engine", None) is not None,
        "policy_held_fraction": _held_fraction(trainer.model_wrapped),
        "ref_held_fraction": _held_fraction(trainer.ref_model),
        **memory,
    }
    processes = gather_object([process]) if trainer.accelerator.num_processes > 1 else [process]
    result = {
        "losses": {str(h["step"]): h["loss"] for h in trainer.state.log_history if "loss" in h},
        "global_step": trainer.state.global_step,
        "processes": processes,
    }
    if trainer.accelerator.is_main_process:
        with open(options.result, "w") as handle:
            json.dump(result, handle, indent=1)
    trainer.accelerator.wait_for_everyone()
    return result


def parse(argv: list[str] | None = None):
    from transformers import HfArgumentParser

    from trl_qrpo import QRPOConfig
    from trl_qrpo.distributed import apply_cpu_only_launch_defaults, check_every_launched_process_joined

    parser = HfArgumentParser((TestOptions, QRPOConfig))
    # As the training script does: a launch of several processes without a GPU gets gloo (DeepSpeed) or use_cpu
    # (DDP) as defaults before the flags become a QRPOConfig; a single process is left as it is.
    apply_cpu_only_launch_defaults(parser, argv)
    options, args = parser.parse_args_into_dataclasses(args=argv)
    check_every_launched_process_joined(args)
    return options, args


if __name__ == "__main__":
    options, args = parse(sys.argv[1:])
    train(options, args)
