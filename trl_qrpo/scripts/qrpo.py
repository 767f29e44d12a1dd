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
import sys
from pathlib import Path


if __name__ == "__main__" and importlib.util.find_spec("trl_qrpo") is None:
    # Launched as a file (`accelerate launch .../trl_qrpo/scripts/qrpo.py`) from a checkout that is not installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trl import ScriptArguments as _TrlScriptArguments  # noqa: E402 (after the path fix above)


# QRPO: file suffixes that name a data file rather than a Hub data set, and the `datasets` builder that reads them.
DATA_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}


def _data_file_builder(path: str) -> str | None:
    lowered = path.lower()
    for suffix, builder in DATA_FILE_BUILDERS.items():
        if lowered.endswith(suffix):
            return builder
    return None


def _saved_to_disk_kind(path: Path) -> str | None:
    """ "dict" for a `DatasetDict.save_to_disk` folder, "dataset" for a `Dataset.save_to_disk` folder, else None."""
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def load_dataset_by_name(name: str, config: str | None = None, train_split: str = "train", streaming: bool = False):
    """
    QRPO: `ScriptArguments.dataset_name` accepts local data as well as Hub ids.

    - a folder written by `save_to_disk`: read with `load_from_disk` (a single `Dataset` becomes the `train_split`);
    - a .json/.jsonl/.parquet/.csv/.arrow file (or glob): read with the matching builder, as the `train_split`;
    - anything else: `datasets.load_dataset(name, name=config, streaming=streaming)`, as in TRL's dpo script.

    Returns a `DatasetDict` (or `IterableDatasetDict` when streaming a Hub data set or file).
    """
    import datasets

    path = Path(name).expanduser()
    kind = _saved_to_disk_kind(path)
    if kind is not None:
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({train_split: loaded})
        return loaded

    builder = _data_file_builder(name)
    if builder is not None:
        if not any(char in name for char in "*?[") and not path.is_file():
            raise FileNotFoundError(f"Data file {name!r} (dataset_name) does not exist.")
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        container = datasets.IterableDatasetDict if streaming else datasets.DatasetDict
        return container({train_split: loaded})

    if path.is_dir() and not any(path.iterdir()):
        raise ValueError(f"dataset_name {name!r} is an empty folder.")
    return datasets.load_dataset(name, name=config, streaming=streaming)


def localize_mixture(mixture_config):
    """
    QRPO: make TRL's `get_dataset` read local data too, by rewriting local entries of `datasets:` into the
    builder + `data_files` form that `datasets.load_dataset` understands (Hub entries are left as they are).

    - a `Dataset.save_to_disk` folder -> `arrow` builder over its shards, under the entry's `split`;
    - a `DatasetDict.save_to_disk` folder -> `arrow` builder with one `data_files` entry per saved split;
    - a .json/.jsonl/.parquet/.csv/.arrow file -> the matching builder, under the entry's `split`.
    """
    entries = []
    for entry in mixture_config.datasets:
        path = Path(entry.path).expanduser()
        kind = _saved_to_disk_kind(path)
        builder = _data_file_builder(entry.path)
        if kind == "dataset":
            entry = dataclasses.replace(entry, path="arrow", data_files={entry.split: str(path / "data-*.arrow")})
        elif kind == "dict":
            import json

            with open(path / "dataset_dict.json") as handle:
                splits = json.load(handle)["splits"]
            if entry.split not in splits:
                raise ValueError(f"Split {entry.split!r} not in {entry.path} (splits: {', '.join(splits)}).")
            entry = dataclasses.replace(
                entry, path="arrow", data_files={entry.split: str(path / entry.split / "data-*.arrow")}
            )
        elif builder is not None and (path.is_file() or any(char in entry.path for char in "*?[")):
            entry = dataclasses.replace(entry, path=builder, data_files={entry.split: str(path)})
        entries.append(entry)
    return dataclasses.replace(mixture_config, datasets=entries)


def _get_split(dataset, split: str, argument: str):
    if split not in dataset:
        raise ValueError(
            f"Split {split!r} ({argument}) is not in the data set; it has: {', '.join(dataset.keys())}. "
            f"Set --{argument}, or for evaluation set --eval_strategy no."
        )
    return dataset[split]


def main(script_args, training_args, model_args, dataset_args):
    import transformers
    from accelerate.logging import get_logger
    from packaging.version import Version
    from trl import get_dataset, get_peft_config, get_quantization_config

    from trl_qrpo import QRPOTrainer

    logger = get_logger(__name__)

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
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")

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
    TRL's [`~trl.ScriptArguments`] (same fields, same defaults); QRPO: `dataset_name` also takes local data.

    Args:
        dataset_name (`str`, *optional*):
            Hub id of the data set, a folder written by `save_to_disk` (a `DatasetDict`, or a `Dataset` used as the
            train split), or a .json/.jsonl/.parquet/.csv/.arrow file used as the train split. Ignored when
            `datasets` is provided.
    """

    dataset_name: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Hub id of the data set, a folder written by `save_to_disk` (a DatasetDict, or a Dataset used as "
            "the train split), or a .json/.jsonl/.parquet/.csv/.arrow file used as the train split. If `datasets` "
            "is provided, this will be ignored."
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
        kwargs.update(description=description, formatter_class=_HelpFormatter)
    if subparsers is not None:
        parser = subparsers.add_parser(
            "qrpo", help="Run the QRPO training script", dataclass_types=dataclass_types, **kwargs
        )
    else:
        parser = TrlParser(dataclass_types, prog=prog, **kwargs)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown for every option (as HfArgumentParser does) and the description kept as written."""


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args, dataset_args)
