"""Writing datasets (a `save_to_disk` folder or a data file), atomic JSON records, and small column checks.

Datasets are read by the package's one loader, :mod:`trl_qrpo.loading`; column names come from
:mod:`trl_qrpo.columns`. The checks raise errors that name the column, the row and the fix.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..columns import CHOSEN, PROMPT, REJECTED

logger = logging.getLogger("trl_qrpo.precompute")


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


def model_name(model) -> str:
    """A printable name of a model given as a path/id or as a loaded model."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return getattr(model, "name_or_path", None) or type(model).__name__


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` as JSON atomically (temporary file, then rename): a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def rows_range(rows: list[int], limit: int = 8) -> str:
    """Row numbers for a message: `3-9` for a run of consecutive rows, else the first `limit` and how many more."""
    if not rows:
        return "none"
    if rows == list(range(rows[0], rows[-1] + 1)) and len(rows) > 2:
        return f"{rows[0]}-{rows[-1]}"
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")


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
    """Give a preference dataset with an implicit prompt an explicit `prompt` column, as DPOTrainer does, after
    checking that its prompts and completions use one format (all plain text or all conversational).

    Args:
        dataset ([`~datasets.Dataset`]):
            A dataset with a `prompt` column, or with `chosen` and `rejected` that share a prompt (TRL's "implicit
            prompt" preference format).

    Returns:
        [`~datasets.Dataset`]: the dataset with a `prompt` column.
    """
    from ..tokenization import check_one_format

    check_one_format(dataset)
    if PROMPT in dataset.column_names:
        return dataset
    if CHOSEN in dataset.column_names and REJECTED in dataset.column_names:
        from trl.data_utils import extract_prompt

        return dataset.map(extract_prompt, desc="Extracting the shared prompt of chosen/rejected")
    raise ValueError(
        f"The dataset has no 'prompt' column (columns: {dataset.column_names}). Add one (plain text or a list of "
        "{'role', 'content'} messages), or give 'chosen' and 'rejected' columns that start with the same prompt."
    )
