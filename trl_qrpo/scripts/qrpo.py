# Mirrors trl/scripts/dpo.py (TRL 1.16) so that a DPO recipe ports by changing the command and adding QRPO's
# fields; what differs is marked "QRPO:".
"""
QRPO training script: `trl qrpo` launches it through `accelerate launch`, exactly as `trl dpo` launches TRL's.

The data set holds rewards: pointwise rows (`prompt`, `completion`, `reward`, `ref_rewards`) or scored pairs
(`prompt`, `chosen`, `rejected`, `chosen_reward`, `rejected_reward`, `ref_rewards`), e.g. the output of the
pre-computation commands (`trl qrpo <subcommand> --help`). It can be a Hub id, a folder written by
`save_to_disk`, or a .json/.jsonl/.parquet/.csv/.arrow file.

```bash
trl qrpo --config recipes/paper/llama-3.1-8b-tulu-3-sft_magpie-air_armorm.yaml

trl qrpo \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct \
    --dataset_name ./outputs/my-dataset-with-ref-rewards \
    --beta 1e-3 \
    --transform identity \
    --learning_rate 1.0e-6 \
    --lr_scheduler_type cosine \
    --warmup_ratio 0.1 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --eval_strategy steps \
    --eval_steps 50 \
    --output_dir Qwen2-0.5B-QRPO

# LoRA, on 8 GPUs with DeepSpeed ZeRO-3 (accelerate's options pass through)
trl qrpo --config my_recipe.yaml --use_peft --lora_r 32 --lora_alpha 16 --accelerate_config zero3
```

Without `trl`: `trl-qrpo ...`, `python -m trl_qrpo ...`, or
`accelerate launch trl_qrpo/scripts/qrpo.py --config recipe.yaml`.
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

if __name__ == "__main__" and importlib.util.find_spec("trl_qrpo") is None:
    # Launched as a file (`accelerate launch .../trl_qrpo/scripts/qrpo.py`) from a checkout that is not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trl import ScriptArguments as _TrlScriptArguments  # noqa: E402 (after the path fix above)

# QRPO: one dataset loader for this script and the pre-computation commands (local folders and files too).
from trl_qrpo.loading import DatasetLoadError, load_dataset_by_name, localize_mixture, with_test_split  # noqa: E402


def _get_split(dataset, split: str, argument: str):
    if split not in dataset:
        raise ValueError(
            f"Split {split!r} ({argument}) is not in the data set; it has: {', '.join(dataset.keys())}. "
            f"Set --{argument}, or for evaluation set --eval_strategy no."
        )
    return dataset[split]


def _reward_columns() -> tuple[str, ...]:
    """The columns `--cast_rewards_to_float` casts: every reward column training reads, and their aliases."""
    from trl_qrpo.columns import ALIASES, COMPLETION_COLUMNS, REF_REWARDS, reward_column

    names = [*(reward_column(side) for side in COMPLETION_COLUMNS), REF_REWARDS]
    return tuple(alias for name in names for alias in (name, *ALIASES.get(name, ())))


def _float_feature(feature):
    """`feature` with every leaf `Value` made float64: `Value('string')` -> `Value('float64')`, a list of them -> a
    list of float64, keeping the list type (List, LargeList) and a fixed length."""
    from datasets import LargeList, List, Value

    if isinstance(feature, Value):
        return Value("float64")
    if isinstance(feature, LargeList):
        return LargeList(_float_feature(feature.feature))
    if isinstance(feature, List):
        return List(_float_feature(feature.feature), length=feature.length)
    raise ValueError(f"holds {feature!r}: only numbers, text or lists of them can be cast to float")


def _first_unreadable(values) -> tuple[int, object] | None:
    """The first (row, value) of a column that Arrow cannot read as a float64 (the same parser `cast_column` uses)."""
    import pyarrow as pa

    for row, value in enumerate(values):
        for item in value if isinstance(value, list) else [value]:
            if item is None:
                continue
            try:
                pa.scalar(item).cast(pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                return row, item
    return None


def cast_rewards_to_float(dataset):
    """
    QRPO: `--cast_rewards_to_float`. Reward columns stored as text (e.g. `"0.5"`, as a .csv or a hand-written .jsonl
    holds them) are cast to float64 with datasets' `cast_column`, in every split: `reward`, `chosen_reward`,
    `rejected_reward`, `ref_rewards` and their accepted aliases (`trl_qrpo.columns.ALIASES`), whichever the data set
    has. Missing values stay missing (training then names them). A value that is not a number is an error that names
    its column, split and row; it is raised here, before any model loads.
    """
    import pyarrow as pa

    splits = dataset.items() if hasattr(dataset, "items") else [(None, dataset)]
    cast = {}
    for split, data in splits:
        features = data.features
        if features is None:  # a streamed data set whose columns are not known before it is read
            which = f" of split '{split}'" if split is not None else ""
            raise ValueError(
                f"--cast_rewards_to_float: the columns{which} are not known before the data is read (a streamed data "
                "set): load it without --dataset_streaming, or store the rewards as numbers."
            )
        for column in _reward_columns():
            if column not in features:
                continue
            where = f"Column '{column}'" + (f" of split '{split}'" if split is not None else "")
            try:
                target = _float_feature(features[column])
            except ValueError as error:
                raise ValueError(f"{where} {error}; --cast_rewards_to_float casts rewards only.") from None
            if target == features[column]:
                continue
            try:
                data = data.cast_column(column, target)
            except (ValueError, TypeError, NotImplementedError, pa.ArrowException) as error:
                # Arrow's error names neither the row nor the column: find them.
                found = _first_unreadable(data[column]) if hasattr(data, "__len__") else None
                if found is None:
                    reason = f"--cast_rewards_to_float could not cast it to float64: {error}"
                    raise ValueError(f"{where}: {reason}") from None
                row, value = found
                raise ValueError(
                    f"{where}, row {row} (0-based): --cast_rewards_to_float cannot read {value!r} as a number. Rewards "
                    "must be numbers: fix or drop this row (or map the column to numbers) before training."
                ) from None
        cast[split] = data
    if list(cast) == [None]:
        return cast[None]
    return type(dataset)(cast)


def main(script_args, training_args, model_args, dataset_args):
    import transformers
    from accelerate.logging import get_logger
    from packaging.version import Version
    from trl import get_dataset, get_peft_config, get_quantization_config

    from trl_qrpo import QRPOTrainer
    from trl_qrpo.distributed import check_every_launched_process_joined

    logger = get_logger(__name__)
    # QRPO: on a multi-process launch without a GPU, refuse processes that did not form one group (they would each
    # train alone). The parser's defaults set such launches up (see `apply_cpu_only_launch_defaults` below).
    check_every_launched_process_joined(training_args)

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    # Load the dataset (QRPO: local folders and files too)
    if dataset_args.datasets and script_args.dataset_name:
        logger.warning(
            "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
            "dataset and `dataset_name` will be ignored."
        )
        dataset = get_dataset(localize_mixture(dataset_args))
    elif dataset_args.datasets and not script_args.dataset_name:
        dataset = get_dataset(localize_mixture(dataset_args))
    elif not dataset_args.datasets and script_args.dataset_name:
        dataset = load_dataset_by_name(
            script_args.dataset_name,
            config=script_args.dataset_config,
            train_split=script_args.dataset_train_split,
            streaming=script_args.dataset_streaming,
        )
        # QRPO: `test_split_size` applies to `dataset_name` too (TRL applies it to mixtures only).
        dataset = with_test_split(
            dataset,
            script_args.dataset_train_split,
            script_args.dataset_test_split,
            dataset_args.test_split_size,
            training_args.seed,
        )
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")

    # QRPO: rewards stored as text, cast on request (before any model loads, so that a bad value fails fast).
    if script_args.cast_rewards_to_float:
        dataset = cast_rewards_to_float(dataset)

    # Initialize the QRPO trainer
    trainer = QRPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=_get_split(dataset, script_args.dataset_train_split, "dataset_train_split"),
        eval_dataset=(
            _get_split(dataset, script_args.dataset_test_split, "dataset_test_split")
            if training_args.eval_strategy != "no"
            else None
        ),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    if script_args.ignore_bias_buffers:
        import torch

        # torch distributed hack
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]

    # Train the model
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # Log training complete
    trainer.accelerator.print("✅ Training completed.")

    # Save and push to Hub
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Finish the trackers and destroy the process group
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


@dataclasses.dataclass
class ScriptArguments(_TrlScriptArguments):
    """
    TRL's [`~trl.ScriptArguments`] (same fields, same defaults); QRPO: `dataset_name` also takes local data, and
    `cast_rewards_to_float` reads rewards stored as text.

    Args:
        dataset_name (`str`, *optional*):
            Hub id of the data set, a folder written by `save_to_disk` (a `DatasetDict`, or a `Dataset` used as the
            train split), or a .json/.jsonl/.parquet/.csv/.arrow file used as the train split. Ignored when
            `datasets` is provided.
        cast_rewards_to_float (`bool`, *optional*, defaults to `False`):
            Cast the reward columns (`reward`, `chosen_reward`, `rejected_reward`, `ref_rewards` and their aliases)
            to float64 with datasets' `cast_column` before training, in every split: for rewards stored as text
            (`"0.5"`). A value that is not a number is an error naming its column and row. Off by default: text
            rewards are refused with a hint, never converted silently.
    """

    dataset_name: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Hub id of the data set, a folder written by `save_to_disk` (a DatasetDict, or a Dataset used as "
            "the train split), or a .json/.jsonl/.parquet/.csv/.arrow file used as the train split. If `datasets` "
            "is provided, this will be ignored."
        },
    )
    cast_rewards_to_float: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "QRPO: cast the reward columns (reward, chosen_reward, rejected_reward, ref_rewards and their "
            "aliases) to float64 with datasets' cast_column before training, for rewards stored as text ('0.5'). A "
            "value that is not a number is an error naming its column and row. Default False: text rewards are "
            "refused."
        },
    )


def make_parser(
    subparsers: argparse._SubParsersAction | None = None, prog: str | None = None, description: str | None = None
):
    """Same as TRL's `make_parser` in trl/scripts/dpo.py, with `QRPOConfig` in place of `DPOConfig`."""
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    from trl_qrpo import QRPOConfig

    dataclass_types = (ScriptArguments, QRPOConfig, ModelConfig, DatasetMixtureConfig)
    kwargs = {}
    if description is not None:
        # The command line's help: a short usage line (argparse's own lists all ~300 flags, 160 lines) and the
        # description, which lists QRPO's own options first.
        usage = "%(prog)s [--config recipe.yaml] [options below] [accelerate launch options]"
        kwargs.update(description=description, formatter_class=_HelpFormatter, usage=usage)
    if subparsers is not None:
        parser = subparsers.add_parser(
            "qrpo", help="Run the QRPO training script", dataclass_types=dataclass_types, **kwargs
        )
    else:
        parser = TrlParser(dataclass_types, prog=prog, **kwargs)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown for every option (as HfArgumentParser does) and the description kept as written."""


def _quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed, when installed, logs "Setting accelerator to CPU" whenever it is imported on a machine without an
    accelerator (transformers imports it to save a model): name the CPU outright there, as DeepSpeed's own
    `DS_ACCELERATOR` allows. A value already set is kept; with an accelerator nothing is set."""
    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available()):
        os.environ["DS_ACCELERATOR"] = "cpu"


if __name__ == "__main__":
    from trl_qrpo.distributed import apply_cpu_only_launch_defaults

    _quiet_deepspeed_on_cpu()

    parser = make_parser()
    # QRPO: a multi-process launch without a GPU gets ddp_backend="gloo" (DeepSpeed) or use_cpu=True (DDP) as
    # defaults, before the flags become a QRPOConfig (building it sets accelerate's state up); the user's values win.
    apply_cpu_only_launch_defaults(parser)
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    try:
        main(script_args, training_args, model_args, dataset_args)
    except (ValueError, DatasetLoadError) as error:
        # QRPO: bad input (a column, a row, an option) is one line that says what to fix, not a long traceback.
        if os.environ.get("TRL_QRPO_TRACEBACK", "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        print(f"trl qrpo: error: {error} (set TRL_QRPO_TRACEBACK=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
