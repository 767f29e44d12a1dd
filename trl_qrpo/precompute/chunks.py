"""Resumable, sharded processing of a dataset in fixed chunks, and the merge of shard outputs.

Every long pre-computation step (generate, score, evaluate) runs through :func:`run_chunked`:

- Rows are cut into chunks of `chunk_size` consecutive rows, numbered by their position in the *whole* dataset. A shard
  (`num_shards`, `shard_index`) takes a contiguous range of whole chunks, so a chunk holds the same rows (and is
  batched the same way) whether the work is sharded or not.
- Each finished chunk is written atomically to `output_dir/chunks/chunk-XXXXXX` (a `save_to_disk` folder written under
  a temporary name, then renamed) with a small JSON record of its rows and a hash of its input. A killed run loses at
  most the chunk in progress; the same command run again skips the finished chunks and recomputes the rest. Since
  randomness is seeded per row (never from a global stream), the rows are exactly those of an uninterrupted run.
- `output_dir/qrpo_manifest.json` records the task, its parameters and the shard; a restart with different parameters
  is refused rather than mixing two runs in one output.
- When every chunk of the shard is done they are concatenated in order and saved to `output_dir` itself, so
  `datasets.load_from_disk(output_dir)` (or `--dataset_name output_dir` of the next command) reads the result.

:func:`merge_shards` concatenates the outputs of `num_shards` shard runs in shard order, after checking that they are
complete, come from the same task and parameters, and cover every shard exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import logger, write_json

MANIFEST_NAME = "qrpo_manifest.json"
CHUNKS_DIR = "chunks"
CHUNK_RECORD = "qrpo_chunk.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardPlan:
    """Which chunks of a dataset one shard processes.

    Args:
        num_rows (`int`):
            Number of rows of the whole dataset (all shards together).
        chunk_size (`int`):
            Rows per chunk: the unit of work that is written to disk and skipped on restart.
        num_shards (`int`, *optional*, defaults to `1`):
            Number of shards the work is split into (one job per shard).
        shard_index (`int`, *optional*, defaults to `0`):
            Index of this shard, in `[0, num_shards)`.
    """

    num_rows: int
    chunk_size: int
    num_shards: int = 1
    shard_index: int = 0

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}.")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {self.num_shards}.")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"shard_index must be in [0, num_shards) = [0, {self.num_shards}), got {self.shard_index}."
            )
        if self.num_rows == 0:
            raise ValueError("The dataset is empty: there is nothing to process.")
        if self.num_shards > self.num_chunks:
            raise ValueError(
                f"num_shards={self.num_shards} is larger than the number of chunks ({self.num_chunks} chunks of "
                f"{self.chunk_size} rows for {self.num_rows} rows): some shards would be empty. Lower --num_shards "
                "or --chunk_size."
            )

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_rows / self.chunk_size)

    @property
    def chunks(self) -> range:
        """The chunk indices of this shard (a contiguous range)."""
        k = self.num_chunks
        return range(self.shard_index * k // self.num_shards, (self.shard_index + 1) * k // self.num_shards)

    def chunk_rows(self, chunk: int) -> range:
        """The dataset rows of chunk `chunk`."""
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_rows))

    @property
    def rows(self) -> range:
        """The dataset rows of this shard."""
        chunks = self.chunks
        return range(self.chunk_rows(chunks[0]).start, self.chunk_rows(chunks[-1]).stop)


@dataclass(frozen=True)
class ChunkedTask:
    """What a chunked run computes, as recorded in its manifest and shown on its progress bar.

    Args:
        name (`str`):
            Name of the step (`"generate"`, `"score"`, `"evaluate"`), stored in the manifest.
        params (`dict`):
            Every parameter that changes the results (JSON-serialisable; other values are stored as strings),
            checked on restart.
        soft_params (`Sequence[str]`, *optional*):
            Parameters that may change between a run and its restart (e.g. a batch size): a change is logged, not
            refused.
        units_per_row (`int` or `Sequence[int]`, *optional*, defaults to `1`):
            Progress-bar units per input row (e.g. completions per prompt), or one count per dataset row.
        unit (`str`, *optional*, defaults to `"row"`):
            Name of a progress-bar unit.
        desc (`str`, *optional*):
            Progress-bar title.
    """

    name: str
    params: dict[str, Any]
    soft_params: Sequence[str] = ()
    units_per_row: int | Sequence[int] = 1
    unit: str = "row"
    desc: str | None = None

    def units(self, rows: range) -> int:
        if isinstance(self.units_per_row, int):
            return len(rows) * self.units_per_row
        return sum(self.units_per_row[i] for i in rows)


@contextlib.contextmanager
def quiet_datasets():
    """Hide `datasets`' own progress bars (saving, loading, concatenating chunks) under the run's progress bar."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def input_hash(rows) -> str:
    """A content hash of a chunk's input rows, to detect a restart on a changed dataset."""
    digest = hashlib.sha256()
    for column in sorted(rows.column_names):
        digest.update(column.encode())
        digest.update(json.dumps(rows[column], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _normalize(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, sort_keys=True, default=str))


def _chunk_dir(output_dir: Path, chunk: int) -> Path:
    return output_dir / CHUNKS_DIR / f"chunk-{chunk:06d}"


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a `trl qrpo` output folder, or `None` when the folder has none."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def prepare_output_dir(output_dir: str | os.PathLike, task: ChunkedTask, plan: ShardPlan) -> dict[str, Any]:
    """Create `output_dir` and its manifest, or check that an existing one belongs to the same run.

    Args:
        output_dir (`str` or `os.PathLike`):
            Folder of the run.
        task ([`ChunkedTask`]):
            The step and its parameters (a change of a parameter not in `task.soft_params` is refused).
        plan ([`ShardPlan`]):
            The shard of the dataset this run processes.

    Returns:
        `dict`: the manifest.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "task": task.name,
        "params": _normalize(task.params),
        "num_rows": plan.num_rows,
        "chunk_size": plan.chunk_size,
        "num_shards": plan.num_shards,
        "shard_index": plan.shard_index,
        "chunks": [plan.chunks.start, plan.chunks.stop],
        "complete": False,
        "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else None,
    }
    existing = read_manifest(output_dir)
    if existing is None:
        if any(p.name not in (CHUNKS_DIR,) for p in output_dir.iterdir()):
            raise ValueError(
                f"output_dir '{output_dir}' is not empty and holds no {MANIFEST_NAME}: it is not the output of an "
                "earlier run of this command. Choose a new or empty folder."
            )
        write_json(output_dir / MANIFEST_NAME, manifest)
        return manifest
    diffs = []
    for key in ("task", "num_rows", "chunk_size", "num_shards", "shard_index"):
        if existing.get(key) != manifest[key]:
            diffs.append(f"{key}: {existing.get(key)!r} -> {manifest[key]!r}")
    old_params = existing.get("params", {})
    soft_changes = []
    for key in sorted(set(old_params) | set(manifest["params"])):
        old, new = old_params.get(key), manifest["params"].get(key)
        if old != new:
            (soft_changes if key in task.soft_params else diffs).append(f"{key}: {old!r} -> {new!r}")
    if diffs and not existing.get("complete") and not _finished_chunks(output_dir):
        # An earlier run that failed before finishing any chunk (e.g. a reward that raised): nothing to resume or
        # to mix with, so the new settings simply start over.
        logger.info(f"'{output_dir}' holds no finished chunk of its earlier run: starting over ({'; '.join(diffs)}).")
        write_json(output_dir / MANIFEST_NAME, manifest)
        return manifest
    if diffs:
        raise ValueError(
            f"output_dir '{output_dir}' holds a run with other settings ({'; '.join(diffs)}). Resuming would mix two "
            "runs in one output. Rerun with the original settings to resume, or choose a new output_dir."
        )
    if soft_changes:
        logger.warning(f"Resuming '{output_dir}' with changed settings: {'; '.join(soft_changes)}.")
        existing["params"] = manifest["params"]
        write_json(output_dir / MANIFEST_NAME, existing)
    return existing


def _finished_chunks(output_dir: Path) -> list[Path]:
    """The finished chunk folders of a run (half-written ones, under temporary names, excluded)."""
    chunks_dir = output_dir / CHUNKS_DIR
    return [p for p in chunks_dir.iterdir() if ".tmp-" not in p.name] if chunks_dir.is_dir() else []


def run_status(output_dir: str | os.PathLike) -> list[str]:
    """Lines that say what a `trl qrpo` output folder holds: done, or which chunks of which shards are missing and the
    command that finishes them (the launcher's per-process shards under `shards/` included)."""
    output_dir = Path(output_dir)
    folders = [output_dir] if read_manifest(output_dir) is not None else []
    shards_dir = output_dir / "shards"
    if shards_dir.is_dir():
        folders += sorted(p for p in shards_dir.iterdir() if read_manifest(p) is not None)
    if not folders:
        return [f"{output_dir}: no {MANIFEST_NAME} here: not the output of a `trl qrpo` pre-computation command."]
    lines = []
    for folder in folders:
        manifest = read_manifest(folder)
        shard = f"shard {manifest['shard_index']} of {manifest['num_shards']}" if manifest["num_shards"] > 1 else ""
        what = f"{folder}: {manifest['task']}" + (f", {shard}" if shard else "")
        if manifest.get("complete"):
            merged = f", merged from {len(manifest['merged_from'])} shards" if manifest.get("merged_from") else ""
            lines.append(f"{what}: complete ({manifest.get('num_output_rows')} rows{merged}).")
            continue
        plan = ShardPlan(manifest["num_rows"], manifest["chunk_size"], manifest["num_shards"], manifest["shard_index"])
        done = {int(p.name.split("-")[1]) for p in _finished_chunks(folder)}
        missing = [c for c in plan.chunks if c not in done]
        rows = [plan.chunk_rows(c) for c in missing]
        where = f"chunks {_ranges(missing)} (rows {rows[0].start}-{rows[-1].stop - 1})" if missing else "no chunk"
        finish = manifest.get("command") or f"the same `trl qrpo {manifest['task']}` command"
        state = "missing " + where if missing else "every chunk done, not yet assembled"
        lines.append(
            f"{what}: {len(plan.chunks) - len(missing)} of {len(plan.chunks)} chunks done, {state}. "
            f"Finish with: {finish}"
        )
    return lines


def _ranges(numbers: list[int]) -> str:
    """`0-3, 7, 9-10` for a sorted list of integers."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start}-{n}" if n > start else str(n))
            start = None
    return ", ".join(parts)


def clean_stale_chunks(output_dir: str | os.PathLike) -> None:
    """Remove chunk folders left half-written by a killed run (their temporary names never became final)."""
    chunks_dir = Path(output_dir) / CHUNKS_DIR
    if chunks_dir.is_dir():
        for path in chunks_dir.iterdir():
            if ".tmp-" in path.name:
                shutil.rmtree(path, ignore_errors=True)


def run_chunked(
    dataset,
    process_chunk: Callable,
    task: ChunkedTask,
    plan: ShardPlan,
    output_dir: str | os.PathLike | None,
    *,
    worker_rank: int = 0,
    num_workers: int = 1,
    assemble: bool = True,
):
    """Run `process_chunk` over the chunks of one shard, writing each result as it finishes, and assemble them.

    Args:
        dataset ([`~datasets.Dataset`]):
            The whole input dataset (all shards); rows are selected by `plan`.
        process_chunk (`Callable`):
            `process_chunk(rows, row_indices, progress) -> Dataset`, where `rows` is the chunk's rows, `row_indices`
            their positions in `dataset` (for per-row seeds) and `progress(n)` advances the progress bar by `n` units.
        task ([`ChunkedTask`]):
            The step, its parameters (stored in the manifest and checked on restart) and its progress bar.
        plan ([`ShardPlan`]):
            The chunks to process.
        output_dir (`str` or `os.PathLike`, *optional*):
            Folder for chunks, manifest and the result. `None` keeps everything in memory (no resume).
        worker_rank (`int`, *optional*, defaults to `0`):
            With `num_workers > 1`, this process handles the chunks `c` with `c % num_workers == worker_rank`.
        num_workers (`int`, *optional*, defaults to `1`):
            Number of processes sharing this shard's chunks (data parallelism on one node).
        assemble (`bool`, *optional*, defaults to `True`):
            Concatenate the shard's chunks and save the result once all are done. Workers pass `False`.

    Returns:
        [`~datasets.Dataset`] (or `None` when `assemble=False`).
    """
    import datasets
    from tqdm.auto import tqdm

    mine = [c for c in plan.chunks if (c - plan.chunks.start) % num_workers == worker_rank]
    units = task.units
    total = sum(units(plan.chunk_rows(c)) for c in mine)
    bar_kwargs = {"total": total, "unit": task.unit, "desc": task.desc, "dynamic_ncols": True}

    if output_dir is None:
        results = []
        with tqdm(**bar_kwargs) as bar, quiet_datasets():
            for chunk in mine:
                rows = plan.chunk_rows(chunk)
                results.append(process_chunk(dataset.select(rows), list(rows), bar.update))
            return datasets.concatenate_datasets(results) if assemble else None

    output_dir = Path(output_dir)
    manifest = prepare_output_dir(output_dir, task, plan)
    if manifest.get("complete"):
        logger.info(f"'{output_dir}' is already complete; loading it.")
        return datasets.load_from_disk(str(output_dir)) if assemble else None
    if num_workers == 1:
        clean_stale_chunks(output_dir)
    (output_dir / CHUNKS_DIR).mkdir(exist_ok=True)

    todo, done_units = [], 0
    for chunk in mine:
        rows = plan.chunk_rows(chunk)
        path = _chunk_dir(output_dir, chunk)
        if path.is_dir():
            record = json.loads((path / CHUNK_RECORD).read_text())
            if record["rows"] != [rows.start, rows.stop] or record["input_hash"] != input_hash(dataset.select(rows)):
                raise ValueError(
                    f"Chunk {chunk} in '{output_dir}' was computed from other input rows than the dataset given now "
                    f"(rows {record['rows']}). The dataset changed since the interrupted run: rerun on the original "
                    "dataset, or choose a new output_dir."
                )
            done_units += units(rows)
        else:
            todo.append(chunk)
    if done_units:
        logger.info(f"Resuming '{output_dir}': {len(mine) - len(todo)} of {len(mine)} chunks already done.")

    with tqdm(initial=done_units, **bar_kwargs) as bar, quiet_datasets():
        for chunk in todo:
            rows = plan.chunk_rows(chunk)
            chunk_input = dataset.select(rows)
            result = process_chunk(chunk_input, list(rows), bar.update)
            final = _chunk_dir(output_dir, chunk)
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            result.save_to_disk(str(tmp))
            write_json(
                tmp / CHUNK_RECORD,
                {
                    "chunk": chunk,
                    "rows": [rows.start, rows.stop],
                    "input_hash": input_hash(chunk_input),
                    "num_output_rows": len(result),
                },
            )
            os.replace(tmp, final)

    if not assemble:
        return None
    with quiet_datasets():
        return assemble_chunks(output_dir, plan)


def assemble_chunks(output_dir: str | os.PathLike, plan: ShardPlan):
    """Concatenate the finished chunks of a shard in order, save them to `output_dir` and mark the run complete."""
    import datasets

    output_dir = Path(output_dir)
    missing = [c for c in plan.chunks if not _chunk_dir(output_dir, c).is_dir()]
    if missing:
        raise RuntimeError(
            f"'{output_dir}' misses chunk(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}: a worker failed. "
            "Run the same command again to compute them."
        )
    parts = [datasets.load_from_disk(str(_chunk_dir(output_dir, c))) for c in plan.chunks]
    result = datasets.concatenate_datasets(parts)
    result.save_to_disk(str(output_dir))
    manifest = read_manifest(output_dir)
    manifest["complete"] = True
    manifest["num_output_rows"] = len(result)
    write_json(output_dir / MANIFEST_NAME, manifest)
    del parts, result
    shutil.rmtree(output_dir / CHUNKS_DIR, ignore_errors=True)
    return datasets.load_from_disk(str(output_dir))


def merge_shards(paths: Sequence[str | os.PathLike], output_dir: str | os.PathLike | None = None):
    """Concatenate the outputs of a sharded run (`num_shards` jobs with `shard_index` 0 .. num_shards-1) in order.

    The shards must be complete and come from the same step, dataset size, chunking and parameters, and together
    cover every shard exactly once; otherwise a `ValueError` names the missing, duplicated or mismatched shard. The
    merged dataset equals the output of the same run unsharded.

    Args:
        paths (`Sequence[str]`):
            Output folders of the shard runs, in any order.
        output_dir (`str` or `os.PathLike`, *optional*):
            Where to save the merged dataset (`save_to_disk`), with a manifest of an unsharded, complete run.

    Returns:
        [`~datasets.Dataset`]: the merged dataset.
    """
    import datasets

    if not paths:
        raise ValueError("merge_shards needs at least one shard folder.")
    manifests = []
    for path in paths:
        manifest = read_manifest(path)
        if manifest is None:
            raise ValueError(
                f"'{path}' has no {MANIFEST_NAME}: it is not the output of a `trl qrpo` command run with "
                "--num_shards/--shard_index. Concatenate plain datasets with `datasets.concatenate_datasets`."
            )
        if not manifest.get("complete"):
            done = len(_finished_chunks(Path(path)))
            total = manifest["chunks"][1] - manifest["chunks"][0]
            raise ValueError(
                f"Shard {manifest['shard_index']} in '{path}' is not complete ({done} of {total} chunks). Run its "
                "command again (same arguments) to finish it, then merge."
            )
        manifests.append((manifest, path))
    first = manifests[0][0]
    for manifest, path in manifests[1:]:
        for key in ("task", "num_rows", "chunk_size", "num_shards", "params"):
            if manifest.get(key) != first.get(key):
                raise ValueError(
                    f"'{path}' and '{manifests[0][1]}' come from different runs ('{key}' differs: "
                    f"{manifest.get(key)!r} vs {first.get(key)!r}). Merge only shards of one run."
                )
    by_index: dict[int, list] = {}
    for manifest, path in manifests:
        by_index.setdefault(manifest["shard_index"], []).append(path)
    duplicated = {i: p for i, p in by_index.items() if len(p) > 1}
    if duplicated:
        raise ValueError(f"Shard(s) given more than once: {duplicated}. Give each shard folder once.")
    missing = sorted(set(range(first["num_shards"])) - set(by_index))
    if missing:
        raise ValueError(
            f"Missing shard(s) {missing} of {first['num_shards']}: run them (--shard_index) and merge all together."
        )
    parts = [datasets.load_from_disk(str(by_index[i][0])) for i in range(first["num_shards"])]
    merged = datasets.concatenate_datasets(parts)
    if output_dir is not None:
        output_dir = Path(output_dir)
        merged.save_to_disk(str(output_dir))
        manifest = dict(
            first, num_shards=1, shard_index=0, chunks=[0, math.ceil(first["num_rows"] / first["chunk_size"])]
        )
        manifest.update(
            complete=True, num_output_rows=len(merged), merged_from=[str(by_index[i][0]) for i in sorted(by_index)]
        )
        write_json(output_dir / MANIFEST_NAME, manifest)
        merged = datasets.load_from_disk(str(output_dir))
    return merged


def _worker_entry(fn_path: str, kwargs: dict[str, Any], rank: int, visible_devices: str | None) -> None:
    if visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    import importlib

    module, name = fn_path.rsplit(".", 1)
    getattr(importlib.import_module(module), name)(**kwargs, _worker_rank=rank)


def spawn_workers(fn_path: str, kwargs: dict[str, Any], num_workers: int, devices_per_worker: int = 1) -> None:
    """Run `fn_path(**kwargs, _worker_rank=r)` in `num_workers` fresh processes (data parallelism on one node).

    Each worker sees its own `devices_per_worker` GPUs through `CUDA_VISIBLE_DEVICES` (taken in order from the GPUs
    visible to this process) and processes every `num_workers`-th chunk of the shard; the caller assembles them.
    A worker that fails makes this function raise after all have ended; chunks that finished are kept for a restart.
    """
    import multiprocessing

    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if gpus and len(gpus) < num_workers * devices_per_worker:
        raise ValueError(
            f"data_parallel_size={num_workers} x tensor_parallel_size={devices_per_worker} needs "
            f"{num_workers * devices_per_worker} GPUs, but {len(gpus)} are visible."
        )
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for rank in range(num_workers):
        devices = ",".join(gpus[rank * devices_per_worker : (rank + 1) * devices_per_worker]) if gpus else None
        proc = ctx.Process(target=_worker_entry, args=(fn_path, kwargs, rank, devices))
        proc.start()
        procs.append(proc)
    failed = []
    for rank, proc in enumerate(procs):
        proc.join()
        if proc.exitcode != 0:
            failed.append((rank, proc.exitcode))
    if failed:
        raise RuntimeError(
            f"Data-parallel worker(s) failed (rank, exit code): {failed}. Finished chunks are kept: run the same "
            "command again to resume."
        )
