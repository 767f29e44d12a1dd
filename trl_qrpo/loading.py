"""One dataset loader for the training script and the pre-computation commands.

A dataset is named the way TRL users name one, or by where it lies on disk:

- a folder written by `save_to_disk` (a `DatasetDict`, or a single `Dataset`, used as the train split): every
  `trl qrpo` pre-computation command writes one;
- a data file whose suffix names its format (:data:`DATA_FILE_BUILDERS`: .json, .jsonl, .parquet, .csv, .arrow, and
  gzipped JSON), or a glob of such files, used as the train split;
- anything else is a Hub id, read with `datasets.load_dataset` as TRL's scripts do.

A name that looks like a local path (a data-file suffix, or a folder that exists) but is not there is reported as a
missing local path, and a Hub id that cannot be read says that no local file or folder of that name exists either, so
a typo never reads as a failed Hub connection.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

# File suffixes that name a data file rather than a Hub dataset, and the `datasets` builder that reads them.
DATA_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
_GLOB_CHARS = "*?["


class DatasetLoadError(FileNotFoundError):
    """A dataset that is neither where its local path points nor a Hub dataset that can be read."""


def data_file_builder(path: str) -> str | None:
    """The `datasets` builder for a data file's suffix (`"json"`, `"parquet"`, ...), or `None`."""
    lowered = str(path).lower()
    for suffix, builder in DATA_FILE_BUILDERS.items():
        if lowered.endswith(suffix):
            return builder
    return None


def saved_to_disk_kind(path: Path) -> str | None:
    """`"dict"` for a `DatasetDict.save_to_disk` folder, `"dataset"` for a `Dataset.save_to_disk` folder, else None."""
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def _hub_error(name: str, error: Exception) -> DatasetLoadError:
    path = Path(name).expanduser().resolve()
    return DatasetLoadError(
        f"Could not load dataset {name!r}. Looked for a local `save_to_disk` folder or data file at '{path}' (there is "
        f"none) and for a Hub dataset of that id, which failed: {error}. Give an existing folder, a data file "
        f"({', '.join(DATA_FILE_BUILDERS)}) or a Hub id that can be reached."
    )


def _first_bad_json_line(path: Path) -> str | None:
    """For a JSON-lines file that does not load: which line is not a JSON object, and why (None when all parse)."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        return f"Data file '{path}' cannot be read as UTF-8 text: {error}."
    stripped = text.lstrip()
    if stripped.startswith("[") or not stripped:  # a JSON array, or nothing: one document, not lines
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f"Data file '{path}', line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})."
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            return (
                f"Data file '{path}', line {number}: not valid JSON ({error.msg} at column {error.colno}): "
                f"{line[:120]!r}. Fix or delete that line (a JSON-lines file holds one JSON object per line)."
            )
        if not isinstance(value, dict):
            return (
                f"Data file '{path}', line {number}: a JSON {type(value).__name__}, not an object (one row per line)."
            )
    return None


def load_dataset_by_name(name: str, config: str | None = None, train_split: str = "train", streaming: bool = False):
    """Load a dataset by Hub id, `save_to_disk` folder or data file, as a `DatasetDict`.

    Args:
        name (`str`):
            Hub id, `save_to_disk` folder, data file (or glob of data files).
        config (`str`, *optional*):
            Dataset configuration name (the `name` argument of [`~datasets.load_dataset`]); Hub datasets only.
        train_split (`str`, *optional*, defaults to `"train"`):
            The split a single saved `Dataset` or a data file becomes.
        streaming (`bool`, *optional*, defaults to `False`):
            Stream data files and Hub datasets (`IterableDatasetDict`); saved folders are memory-mapped anyway.

    Returns:
        [`~datasets.DatasetDict`] (or [`~datasets.IterableDatasetDict`] when streaming a Hub dataset or file).
    """
    import datasets

    name = str(name)
    path = Path(name).expanduser()
    kind = saved_to_disk_kind(path)
    if kind is not None:
        loaded = datasets.load_from_disk(str(path))
        return datasets.DatasetDict({train_split: loaded}) if isinstance(loaded, datasets.Dataset) else loaded

    builder = data_file_builder(name)
    if builder is not None:
        if not any(char in name for char in _GLOB_CHARS) and not path.is_file():
            raise DatasetLoadError(
                f"Data file {name!r} does not exist (looked for '{path.resolve()}'). Check the path, or give a Hub "
                "dataset id without a file suffix."
            )
        try:
            loaded = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
        except Exception as error:  # pyarrow's and datasets' parse errors name neither the file nor the line
            bad = _first_bad_json_line(path) if builder == "json" else None
            if bad is None:
                raise
            raise DatasetLoadError(bad) from error
        container = datasets.IterableDatasetDict if streaming else datasets.DatasetDict
        return container({train_split: loaded})

    if path.is_dir():
        if not any(path.iterdir()):
            raise ValueError(f"Dataset {name!r} is an empty folder: nothing to load.")
        if (path / "data").is_dir() or any(data_file_builder(p.name) for p in path.iterdir()):
            return datasets.load_dataset(str(path), name=config, streaming=streaming)  # a folder of data files
        raise DatasetLoadError(
            f"Folder {name!r} is neither a `save_to_disk` folder (no dataset_dict.json or state.json + "
            f"dataset_info.json) nor a folder of data files ({', '.join(DATA_FILE_BUILDERS)})."
        )
    if name.startswith((".", "/", "~")) or name.endswith(("/", "\\")):
        raise DatasetLoadError(f"Local dataset folder {name!r} does not exist (looked for '{path.resolve()}').")
    try:
        return datasets.load_dataset(name, name=config, streaming=streaming)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:
        raise _hub_error(name, error) from error


def load_split(name: str, config: str | None = None, split: str = "train"):
    """One split of a dataset named as for [`load_dataset_by_name`] (a saved `Dataset` or data file is `split`)."""
    loaded = load_dataset_by_name(name, config=config, train_split=split)
    if split not in loaded:
        raise ValueError(f"Dataset {name!r} has no split {split!r}; it has {list(loaded)}. Set --dataset_split.")
    return loaded[split]


def with_test_split(dataset, train_split: str, test_split: str, test_size: float | None, seed: int):
    """Carve a test split of `test_size` out of the train split (TRL's `test_split_size`), for a named dataset.

    TRL applies `test_split_size` to dataset mixtures only; the training script applies it to `dataset_name` too, so
    the flag listed in `--help` is never ignored. A dataset that already has `test_split` is an error: say which to use.
    """
    if test_size is None:
        return dataset
    import datasets

    if test_split in dataset:
        raise ValueError(
            f"--test_split_size {test_size} would carve a test split out of '{train_split}', but the dataset already "
            f"has a '{test_split}' split. Remove --test_split_size to use it, or set --dataset_test_split to another "
            "name."
        )
    if isinstance(dataset, datasets.IterableDatasetDict):
        raise ValueError("--test_split_size needs a map-style dataset: remove --dataset_streaming.")
    parts = dataset[train_split].train_test_split(test_size=test_size, seed=seed)
    return datasets.DatasetDict({**dataset, train_split: parts["train"], test_split: parts["test"]})


def localize_mixture(mixture_config):
    """Make TRL's `get_dataset` read local data too, by rewriting local entries of `datasets:` into the builder +
    `data_files` form that `datasets.load_dataset` understands (Hub entries are left as they are).

    - a `Dataset.save_to_disk` folder -> `arrow` builder over its shards, under the entry's `split`;
    - a `DatasetDict.save_to_disk` folder -> `arrow` builder with the entry's saved split;
    - a data file (or glob) -> the matching builder, under the entry's `split`.
    """
    entries = []
    for entry in mixture_config.datasets:
        path = Path(entry.path).expanduser()
        kind = saved_to_disk_kind(path)
        builder = data_file_builder(entry.path)
        if kind == "dataset":
            entry = dataclasses.replace(entry, path="arrow", data_files={entry.split: str(path / "data-*.arrow")})
        elif kind == "dict":
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            if entry.split not in splits:
                raise ValueError(f"Split {entry.split!r} not in {entry.path} (splits: {', '.join(splits)}).")
            entry = dataclasses.replace(
                entry, path="arrow", data_files={entry.split: str(path / entry.split / "data-*.arrow")}
            )
        elif builder is not None:
            if not (path.is_file() or any(char in entry.path for char in _GLOB_CHARS)):
                raise DatasetLoadError(f"Data file {entry.path!r} (datasets entry) does not exist.")
            entry = dataclasses.replace(entry, path=builder, data_files={entry.split: str(path)})
        entries.append(entry)
    return dataclasses.replace(mixture_config, datasets=entries)
