"""`iterative_qrpo`: run the stages of :func:`.plan.plan_stages` in order, resuming where a run stopped.

Each stage writes one folder. The run's state file (`output_dir/iterate_state.json`) records each finished stage with
its fingerprint (command and options). Run again, a finished stage is skipped; an unfinished one runs again and
resumes by its own means (the pre-computation commands keep their finished chunks; training resumes from its last
checkpoint when it saved some); a finished stage whose options changed is refused. A finished stage whose folder has
gone is redone, and every stage after it too (their folders are removed: they were computed from the old one).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ..precompute.io import write_json
from .config import IterateConfig
from .plan import Stage, plan_stages
from .rows import build_round_rows, write_prompts
from .summary import write_summary

logger = logging.getLogger("trl_qrpo.iterative")

STATE_NAME = "iterate_state.json"
CONFIG_NAME = "iterate.yaml"
STAGES_DIR = "stages"  # the --config YAML of every command stage, to rerun one by hand


class StageFailed(RuntimeError):
    """A stage's command failed; its own error was printed above."""


def _check_start_model(name: str) -> None:
    """A starting model that is neither a folder here nor shaped like a Hub id (`owner/name`), before any stage."""
    if Path(name).expanduser().is_dir():
        return
    if Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ValueError(
            f"model_name_or_path '{name}' is not a folder (and not a Hub id, owner/name). For the quick start's model, "
            f"`trl qrpo prepare-smollm2 --output_dir {name}` makes it (offline, about 25 s)."
        )


def _load_state(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def _check_unchanged(stages: list[Stage], state: dict) -> None:
    """Refuse, before anything runs, a finished stage whose command or options the configuration now changes."""
    for stage in stages:
        record = state["stages"].get(stage.name)
        if record is not None and record["fingerprint"] != stage.fingerprint() and Path(stage.output_dir).exists():
            raise ValueError(
                f"Stage {stage.name} was finished with other options than the configuration now gives it. Restore "
                f"the options, or delete '{stage.output_dir}' to redo it (and the stages after it) with the new ones."
            )


def _is_finished(stage: Stage, record: dict | None) -> bool:
    return record is not None and record["fingerprint"] == stage.fingerprint() and Path(stage.output_dir).exists()


def _stage_yaml(config: IterateConfig, stage: Stage) -> Path:
    path = Path(config.output_dir) / STAGES_DIR / f"{stage.name.replace('/', '-')}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(stage.options)
    if stage.command == "train" and any(Path(stage.output_dir).glob("checkpoint-*")):
        options["resume_from_checkpoint"] = True  # a killed training resumes from its last checkpoint
        logger.info(f"{stage.name}: resuming training from the last checkpoint in {stage.output_dir}.")
    path.write_text(f"# {stage.name}: written by `trl qrpo iterate`\n" + yaml.safe_dump(options, sort_keys=False))
    return path


def _train_in_process(config_path: Path) -> None:
    from ..scripts.qrpo import main, make_parser

    parsed = make_parser().parse_args_and_config(args=["--config", str(config_path)], fail_with_unknown_args=False)
    main(*parsed[:4])


def _run_command(config: IterateConfig, stage: Stage) -> None:
    config_path = _stage_yaml(config, stage)
    words = [] if stage.command == "train" else [stage.command]
    shown = " ".join(["trl qrpo", *words, "--config", str(config_path)])
    logger.info(f"{stage.name}: {shown}")
    if config.stage_processes:
        status = subprocess.call([sys.executable, "-m", "trl_qrpo", *words, "--config", str(config_path)])
        if status in (130, -2):
            raise KeyboardInterrupt
        if status != 0:
            raise StageFailed(f"Stage {stage.name} failed (exit status {status}; its error is above): {shown}")
        return
    if stage.command == "train":
        _train_in_process(config_path)
        return
    from ..scripts.precompute_cli import SUBCOMMANDS

    status = SUBCOMMANDS[stage.command](["--config", str(config_path)], f"trl qrpo {stage.command}")
    if status == 130:  # the command caught Ctrl-C and said how to resume it: stop the run as well
        raise KeyboardInterrupt
    if status != 0:
        raise StageFailed(f"Stage {stage.name} failed (exit status {status}; its error is above): {shown}")


def run_stage(config: IterateConfig, stage: Stage) -> None:
    """Run one stage: the run's own model-free steps here, the commands in a new process or in this one."""
    if stage.command in ("prompts", "build-offpolicy"):  # seconds of work, written at once: an unfinished one restarts
        shutil.rmtree(stage.output_dir, ignore_errors=True)
    if stage.command == "prompts":
        write_prompts(stage.options)
    elif stage.command == "build-offpolicy":
        build_round_rows(stage.options)
    else:
        _run_command(config, stage)


def iterative_qrpo(config: IterateConfig) -> dict:
    """Iterative QRPO: `config.num_rounds` rounds of generate, score, build rows, train and evaluate.

    Args:
        config ([`IterateConfig`]): The starting model, the prompts, the rounds, `anchored`, and each stage's options.

    Returns:
        `dict`: the summary (also written to `output_dir/summary.json`, `summary.md` and, with matplotlib,
        `summary.png`): one entry per evaluated policy with its reward, KL to the starting model and to its round's
        reference, and length.
    """
    output_dir = Path(config.output_dir)
    state_path = output_dir / STATE_NAME
    state = _load_state(state_path)
    stages = plan_stages(config)
    _check_start_model(config.model_name_or_path)
    _check_unchanged(stages, state)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_NAME).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    redo_from = None
    for k, stage in enumerate(stages):
        # The starting model's evaluation depends on no other stage, and no round depends on it.
        independent = stage.round is None
        if (redo_from is None or independent) and _is_finished(stage, state["stages"].get(stage.name)):
            logger.info(f"{stage.name}: finished earlier, kept ({stage.output_dir}).")
            continue
        if redo_from is None and not independent:
            redo_from = k
            later = [s for s in stages[k + 1 :] if s.name in state["stages"] or Path(s.output_dir).exists()]
            if later:
                logger.warning(
                    f"{stage.name} is not finished: the {len(later)} stage(s) after it are redone too, their folders "
                    f"removed ({', '.join(s.name for s in later)})."
                )
                for s in later:
                    state["stages"].pop(s.name, None)
                    shutil.rmtree(s.output_dir, ignore_errors=True)
                write_json(state_path, state)
        started = time.time()
        run_stage(config, stage)
        state["stages"][stage.name] = {
            "fingerprint": stage.fingerprint(),
            "command": stage.command,
            "seconds": round(time.time() - started, 1),
        }
        write_json(state_path, state)
        if stage.command == "evaluate" or stage.name.endswith("evaluate-ref-logps"):
            write_summary(config)
    return write_summary(config)
