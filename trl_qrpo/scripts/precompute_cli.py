"""Command line of QRPO's pre-computation phase: `generate`, `score`, `build-offpolicy`, `merge`, `evaluate`.

Each command is a function `fn(argv: list[str], prog: str) -> int` in :data:`SUBCOMMANDS`; the `trl qrpo` /
`trl-qrpo` front end routes to them. Each parses its config dataclass (trl_qrpo/precompute/config.py, the same object
the Python function takes) with TRL's `TrlParser`, so `--config recipe.yaml` works as for TRL's own commands (YAML
keys are field names; flags override them; an `env:` mapping sets environment variables).

Examples::

    trl-qrpo generate --dataset_name trl-lib/ultrafeedback-prompt --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --num_generations 8 --max_new_tokens 1024 --output_dir data/refs
    trl-qrpo score --dataset_name data/refs --reward_model_name_or_path Skywork/Skywork-Reward-V2-Qwen3-0.6B \\
        --output_dir data/scored
    trl-qrpo build-offpolicy --dataset_name data/scored --mode best_worst --num_candidates 6 --output_dir data/train
    trl-qrpo evaluate --dataset_name data/test_prompts --model_name_or_path runs/qrpo \\
        --ref_model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --reward_model_name_or_path ... --output_dir eval/qrpo
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from trl_qrpo.precompute.config import (
    BuildOffPolicyConfig,
    DataArguments,
    EvaluateConfig,
    GenerateConfig,
    MergeConfig,
    RefLogpsConfig,
    ScoreConfig,
    has_reward,
)

# The dataclasses each command parses, as TRL's scripts parse `ScriptArguments` beside the trainer's config: the input
# and export options (`DataArguments`) and the command's config, which its function takes. `merge` reads no dataset.
COMMAND_CONFIGS = {
    "generate": (DataArguments, GenerateConfig),
    "score": (DataArguments, ScoreConfig),
    "build-offpolicy": (DataArguments, BuildOffPolicyConfig),
    "ref-logps": (DataArguments, RefLogpsConfig),
    "merge": (MergeConfig,),
    "evaluate": (DataArguments, EvaluateConfig),
}

# Under a launcher, where each process's shard goes (inside --output_dir).
SHARDS_DIR = "shards"

# Arguments each command cannot run without (checked by the parser, before any work).
_REQUIRED = {
    "generate": ("dataset_name", "output_dir", "model_name_or_path"),
    "score": ("dataset_name", "output_dir"),
    "build-offpolicy": ("dataset_name", "output_dir"),
    "ref-logps": ("dataset_name", "output_dir", "model_name_or_path"),
    "merge": ("shard_dirs", "output_dir"),
    "evaluate": ("dataset_name", "output_dir", "model_name_or_path"),
}


def setup_logging() -> None:
    logger = logging.getLogger("trl_qrpo")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _parse(command: str, argv: list[str], prog: str):
    """Parse a command's dataclasses (`COMMAND_CONFIGS`) from flags and `--config`; check the required ones."""
    from trl import TrlParser

    classes = COMMAND_CONFIGS[command]
    parser = TrlParser(classes, prog=prog, description=classes[-1].__doc__)
    parsed = parser.parse_args_and_config(args=argv)
    missing = [name for name in _REQUIRED[command] if all(getattr(args, name, None) in (None, []) for args in parsed)]
    if missing:
        parser.error(f"missing required argument(s): {', '.join('--' + r for r in missing)}")
    if command in ("score", "evaluate") and not has_reward(parsed[-1]):
        parser.error("give a reward: --reward_model_name_or_path and/or --reward_funcs.")
    setup_logging()
    return parsed


def _load(args):
    from trl_qrpo.loading import load_split

    dataset = load_split(args.dataset_name, args.dataset_config, args.dataset_split)
    if args.max_rows is not None:
        dataset = dataset.select(range(min(args.max_rows, len(dataset))))
    return dataset


def _finish(dataset, args, output_dir: str, sharded: bool = False) -> None:
    """Export (`output_file`), push (`push_to_hub`) and log the result of a command; `args` holds the export options."""
    from trl_qrpo.precompute.io import save_any_dataset

    logger = logging.getLogger("trl_qrpo.precompute")
    if args.output_file:
        save_any_dataset(dataset, args.output_file)
        logger.info(f"Exported {len(dataset)} rows to {args.output_file}.")
    if args.push_to_hub:
        if sharded:
            logger.warning("Not pushing one shard to the Hub: merge the shards (`merge`) and push the result.")
        else:
            dataset.push_to_hub(args.hub_dataset_id)
    logger.info(f"Wrote {len(dataset)} rows to {output_dir}.")


def _launched() -> tuple[int, int] | None:
    """(rank, world size) in a process that `torchrun` or `accelerate launch` started with several processes."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return (rank, world) if world > 1 else None


def _shards_or_one(fn, data, args):
    """Run a step alone, or under a launcher as one shard per process (its rank), merged when every shard is done.

    Under `torchrun --nproc_per_node N` or `accelerate launch --num_processes N` (several nodes too), process `r`
    computes shard `r` of `N` into `output_dir/shards/`, resumable like any shard; the process of rank 0 waits for
    every shard to finish and merges them into `output_dir`, which then equals a one-process run.

    Returns the result (alone, or merged in the process of rank 0); `None` in the other processes of a launch.
    """
    launch = _launched()
    if launch is None:
        result = fn(_load(data), args)
        _finish(result, data, args.output_dir, sharded=args.num_shards > 1)
        return result
    from trl_qrpo.precompute import merge_shards
    from trl_qrpo.precompute.chunks import read_manifest

    rank, world = launch
    if args.num_shards != 1:
        raise ValueError(
            f"Launched as {world} processes, each takes one shard from its rank: remove --num_shards and --shard_index "
            "(or run the shards as separate jobs without the launcher)."
        )
    shard_dirs = [Path(args.output_dir) / SHARDS_DIR / f"shard-{i:05d}-of-{world:05d}" for i in range(world)]
    fn(_load(data), dataclasses.replace(args, num_shards=world, shard_index=rank, output_dir=str(shard_dirs[rank])))
    if rank != 0:
        return None
    logging.getLogger("trl_qrpo.precompute").info(f"Rank 0: merging the {world} shards when every one is done.")
    while not all((read_manifest(d) or {}).get("complete") for d in shard_dirs):  # the launcher ends us if one fails
        time.sleep(2)
    merged = merge_shards(shard_dirs, args.output_dir)
    _finish(merged, data, args.output_dir)
    return merged


def _evaluation_summary(dataset, output_dir: str) -> None:
    """After merging `evaluate` shards: the summary of every sample (`summary.json` in `output_dir`), printed."""
    from trl_qrpo.precompute import read_manifest, summarize_evaluation
    from trl_qrpo.precompute.evaluate import SUMMARY_NAME
    from trl_qrpo.precompute.io import write_json

    manifest = read_manifest(output_dir)
    if manifest.get("task") != "evaluate":
        return
    summary = summarize_evaluation(dataset, meta=dict(manifest["params"], merged_from=manifest["merged_from"]))
    write_json(Path(output_dir) / SUMMARY_NAME, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "meta"}, indent=2))


def _run(fn):
    """Bad input (ValueError, a dataset that cannot be found) as a one-line error with exit code 2; Ctrl-C as one
    line saying how to resume."""
    from trl_qrpo.loading import DatasetLoadError

    def command(argv: list[str], prog: str) -> int:
        try:
            return fn(list(argv), prog)
        except (ValueError, DatasetLoadError) as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(
                f"\n{prog}: interrupted. Finished chunks are kept in --output_dir: run the same command again to "
                "resume where it stopped.",
                file=sys.stderr,
            )
            return 130

    command.__name__, command.__doc__ = fn.__name__, fn.__doc__
    return command


@_run
def generate_main(argv: list[str], prog: str = "trl qrpo generate") -> int:
    """Sample reference completions: see `GenerateConfig` and `trl_qrpo.precompute.generate_references`."""
    from trl_qrpo.precompute import generate_references

    data, args = _parse("generate", argv, prog)
    _shards_or_one(generate_references, data, args)
    return 0


@_run
def score_main(argv: list[str], prog: str = "trl qrpo score") -> int:
    """Score completions and references: see `ScoreConfig` and `trl_qrpo.precompute.score_dataset`."""
    from trl_qrpo.precompute import score_dataset

    data, args = _parse("score", argv, prog)
    _shards_or_one(score_dataset, data, args)
    return 0


@_run
def build_offpolicy_main(argv: list[str], prog: str = "trl qrpo build-offpolicy") -> int:
    """Build off-policy training rows: see `BuildOffPolicyConfig` and `build_offpolicy_dataset`."""
    from trl_qrpo.precompute import build_offpolicy_dataset

    data, args = _parse("build-offpolicy", argv, prog)
    dataset = build_offpolicy_dataset(_load(data), args)
    dataset.save_to_disk(args.output_dir)
    _finish(dataset, data, args.output_dir)
    return 0


@_run
def ref_logps_main(argv: list[str], prog: str = "trl qrpo ref-logps") -> int:
    """Reference log-probs of every completion: see `RefLogpsConfig` and `trl_qrpo.precompute.compute_ref_logps`."""
    from trl_qrpo.precompute import compute_ref_logps

    data, args = _parse("ref-logps", argv, prog)
    _shards_or_one(compute_ref_logps, data, args)
    return 0


@_run
def merge_main(argv: list[str], prog: str = "trl qrpo merge") -> int:
    """Merge shard outputs: see `MergeConfig` and `trl_qrpo.precompute.merge_shards`."""
    from trl_qrpo.precompute import merge_shards

    (args,) = _parse("merge", argv, prog)
    dataset = merge_shards(args.shard_dirs, args.output_dir)
    _evaluation_summary(dataset, args.output_dir)
    _finish(dataset, args, args.output_dir)
    return 0


@_run
def evaluate_main(argv: list[str], prog: str = "trl qrpo evaluate") -> int:
    """Evaluate a policy's own samples: see `EvaluateConfig` and `trl_qrpo.precompute.evaluate_policy`."""
    from trl_qrpo.precompute import evaluate_policy

    data, args = _parse("evaluate", argv, prog)
    if _launched() is None:
        samples, summary = evaluate_policy(_load(data), args)
        print(json.dumps({k: v for k, v in summary.items() if k != "meta"}, indent=2))
        _finish(samples, data, args.output_dir, sharded=args.num_shards > 1)
        return 0
    # Under a launcher: one shard per process; rank 0 merges them and summarises every sample, as `merge` does.
    merged = _shards_or_one(lambda dataset, shard_args: evaluate_policy(dataset, shard_args)[0], data, args)
    if merged is not None:
        _evaluation_summary(merged, args.output_dir)
    return 0


def status_main(argv: list[str], prog: str = "trl qrpo status") -> int:
    """Which chunks and shards of a pre-computation output folder are done, missing or failed, and how to finish."""
    import argparse

    from trl_qrpo.precompute.chunks import run_status

    parser = argparse.ArgumentParser(prog=prog, description=status_main.__doc__)
    parser.add_argument("output_dir", help="The --output_dir of a generate/score/ref-logps/evaluate run.")
    lines = run_status(parser.parse_args(argv).output_dir)
    print("\n".join(lines))
    return 0 if all(": complete" in line for line in lines) else 1


SUBCOMMANDS = {
    "generate": generate_main,
    "score": score_main,
    "build-offpolicy": build_offpolicy_main,
    "ref-logps": ref_logps_main,
    "merge": merge_main,
    "evaluate": evaluate_main,
    "status": status_main,
}

# One-line help per subcommand, for the front end's listing.
HELP = {
    "generate": "Sample n reference completions per prompt from the reference model.",
    "score": "Score the dataset's completions and the reference completions (reward model and/or functions).",
    "build-offpolicy": "Build training rows from the reference completions (pointwise, best/worst or random pairs).",
    "ref-logps": "Reference log-probs of every completion, so that training loads no reference model.",
    "merge": "Merge the outputs of a sharded generate/score/ref-logps/evaluate run.",
    "evaluate": "Reward, KL to the reference model and length of a policy's own samples.",
    "status": "Which chunks and shards of an output folder are done or missing, and the command that finishes them.",
}
