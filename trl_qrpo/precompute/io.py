"""Reading and writing datasets the way TRL users name them: a Hub id, a `save_to_disk` folder or a data file.

Also the column names that the pre-computation phase writes and reads, and small helpers that check a dataset's
columns with an error that names the column, the row and the fix.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("trl_qrpo.precompute")

# Completion columns of the dataset (TRL's names) and the reward column each one gets.
COMPLETION_REWARD_COLUMNS = {"completion": "reward", "chosen": "chosen_reward", "rejected": "rejected_reward"}
REF_COMPLETIONS = "ref_completions"
REF_REWARDS = "ref_rewards"
REF_TRUNCATED = "ref_truncated"
REF_NUM_TOKENS = "ref_num_tokens"
# Columns that hold one entry per reference completion.
REF_LIST_COLUMNS = (REF_COMPLETIONS, REF_REWARDS, REF_TRUNCATED, REF_NUM_TOKENS)

# File extensions read and written with the matching `datasets` builder / exporter.
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "dataset_info.json").is_file()
    )


def load_any_dataset(name_or_path: str, config: str | None = None, split: str | None = "train"):
    """Load a dataset by Hub id, local `save_to_disk` folder or data file (json, jsonl, parquet, csv, arrow).

    Args:
        name_or_path (`str`):
            A Hub dataset id (e.g. `"trl-lib/ultrafeedback_binarized"`), a folder written by
            [`~datasets.Dataset.save_to_disk`] (as every `trl qrpo` command writes), a data file whose extension names
            its format, or a folder of data files that [`~datasets.load_dataset`] understands.
        config (`str`, *optional*):
            Dataset configuration name (the `name` argument of [`~datasets.load_dataset`]).
        split (`str`, *optional*, defaults to `"train"`):
            Split to return. A single saved [`~datasets.Dataset`] or a data file has no splits: it is returned whole.

    Returns:
        [`~datasets.Dataset`]
    """
    import datasets

    path = Path(name_or_path).expanduser()
    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read '{path}': unknown extension '{path.suffix}'. Use one of {sorted(_FILE_BUILDERS)} or a "
                "folder written by `Dataset.save_to_disk`."
            )
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        loaded = datasets.load_dataset(str(name_or_path), name=config, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"Dataset '{name_or_path}' has no split '{split}'; it has {list(loaded)}.")
        loaded = loaded[split]
    return loaded


def save_any_dataset(dataset, path: str) -> None:
    """Write `dataset` to a `save_to_disk` folder or, by extension, to a json/jsonl/parquet/csv file.

    Args:
        dataset ([`~datasets.Dataset`]):
            Dataset to write.
        path (`str`):
            Destination. A path ending in `.json` or `.jsonl` (JSON lines), `.parquet` or `.csv` is exported to that
            format; anything else is a folder for [`~datasets.Dataset.save_to_disk`].
    """
    suffix = Path(path).suffix.lower()
    if suffix in (".json", ".jsonl"):
        dataset.to_json(path, lines=True, force_ascii=False)
    elif suffix == ".parquet":
        dataset.to_parquet(path)
    elif suffix == ".csv":
        dataset.to_csv(path)
    else:
        dataset.save_to_disk(path)


def path_str(value):
    """`os.PathLike` objects as strings (model and dataset paths may be given as `pathlib.Path`); others unchanged."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON atomically (temporary file, then rename): a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def require_columns(dataset, columns: list[str], what: str, fix: str) -> None:
    """Raise a `ValueError` naming the missing columns, what needs them and how to get them."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{what} needs the column(s) {missing}, but the dataset has {dataset.column_names}. {fix}")


def is_conversational_value(value) -> bool:
    """Whether a prompt/completion value is a list of `{"role", "content"}` messages (TRL's conversational format)."""
    from trl.data_utils import is_conversational

    return isinstance(value, list) and len(value) > 0 and is_conversational({"prompt": value})


def ensure_prompt_column(dataset):
    """Give a preference dataset with an implicit prompt an explicit `prompt` column, as DPOTrainer does.

    Args:
        dataset ([`~datasets.Dataset`]):
            A dataset with a `prompt` column, or with `chosen` and `rejected` that share a prompt (TRL's "implicit
            prompt" preference format).

    Returns:
        [`~datasets.Dataset`]: the dataset with a `prompt` column.
    """
    if "prompt" in dataset.column_names:
        return dataset
    if "chosen" in dataset.column_names and "rejected" in dataset.column_names:
        from trl.data_utils import extract_prompt

        return dataset.map(extract_prompt, desc="Extracting the shared prompt of chosen/rejected")
    raise ValueError(
        f"The dataset has no 'prompt' column (columns: {dataset.column_names}). Add one (plain text or a list of "
        "{'role', 'content'} messages), or give 'chosen' and 'rejected' columns that start with the same prompt."
    )
