"""Startup hook that adds `qrpo` to TRL's command line (`trl qrpo ...`).

Why this exists and why it looks like this is explained at the top of `trl_qrpo/cli.py`. In short: TRL 1.16's
`trl.cli.commands.get_commands()` returns a fixed list and offers no plugin hook, so the installed package ships a
`.pth` file (written by `trl_qrpo/_build.py`) whose single line loads this file at interpreter start-up and calls
`install()`.

Rules this module keeps, because it runs in every Python process of the environment:
- standard library only, nothing heavy: it neither imports TRL nor the `trl_qrpo` package (the `.pth` line loads
  this file by path under the private name `_trl_qrpo_hook`, so an installed copy of `trl_qrpo` is never put in
  `sys.modules` behind the back of a checkout being tested);
- it only acts when `trl.cli.commands` is imported, i.e. when someone runs TRL's CLI: a `sys.meta_path` finder
  waits for that module name, lets the normal finders locate it, and wraps the loader so that, right after the
  module has executed, `get_commands` is replaced by a wrapper that appends a `qrpo` command. `trl.cli.main`
  does `from .commands import get_commands` after that, so it picks up the wrapper. After its one answer the
  finder stays in `sys.meta_path` but is inert (one string comparison per import; removing itself while the import
  system iterates over `sys.meta_path` would make that loop skip a finder);
- it can never break `trl` or Python start-up: every step is guarded, and on any failure the original
  `get_commands` result is returned unchanged. Set `TRL_QRPO_DISABLE_TRL_HOOK=1` to switch it off, and
  `TRL_QRPO_DEBUG_TRL_HOOK=1` to print the reason when `qrpo` could not be registered;
- if TRL ever registers a command named `qrpo` itself, the wrapper adds nothing;
- it also swaps TRL's `env` command (`trl env`) for `trl_qrpo.cli.QRPOEnvCommand`, which prints TRL's own report
  with trl-qrpo's version and the state of this hook added; any error there leaves TRL's `env` in place.
"""

from __future__ import annotations

import os
import sys

TARGET_MODULE = "trl.cli.commands"
COMMAND_NAME = "qrpo"
DISABLE_ENV = "TRL_QRPO_DISABLE_TRL_HOOK"
DEBUG_ENV = "TRL_QRPO_DEBUG_TRL_HOOK"
_MARK = "_trl_qrpo_hook"


def _debug(message: str) -> None:
    if os.environ.get(DEBUG_ENV):
        print(f"[trl-qrpo hook] {message}", file=sys.stderr)


def _make_qrpo_command():
    # Imported only when TRL's CLI asks for its command list, never at start-up.
    from trl_qrpo.cli import QRPOCommand

    return QRPOCommand()


def _make_env_command(original):
    # TRL's `env` report with trl-qrpo's version in it; imported only when TRL's CLI asks for its command list.
    from trl_qrpo.cli import QRPOEnvCommand

    return QRPOEnvCommand(help_text=getattr(original, "help_text", None) or "Print the environment information")


def _with_our_env(commands):
    """`commands` with TRL's own `env` command (and only TRL's, class `EnvCommand`) replaced by ours; fail-safe."""
    try:
        return [
            _make_env_command(command)
            if getattr(command, "name", None) == "env" and type(command).__name__ == "EnvCommand"
            else command
            for command in commands
        ]
    except Exception as error:  # `trl env` then prints TRL's report without our lines
        _debug(f"could not extend `trl env`: {type(error).__name__}: {error}")
        return commands


def wrap_get_commands(original):
    """
    Return a `get_commands` that appends the `qrpo` command to `original()`'s list and swaps TRL's `env` for one
    that also reports trl-qrpo (idempotent, fail-safe: on any error each command stays TRL's own).
    """
    if getattr(original, _MARK, False):
        return original

    def get_commands():
        commands = original()
        try:
            if any(getattr(command, "name", None) == COMMAND_NAME for command in commands):
                return commands
            commands = _with_our_env(list(commands)) + [_make_qrpo_command()]
        except Exception as error:  # never break `trl`: fall back to TRL's own list
            _debug(f"could not register `trl {COMMAND_NAME}`: {type(error).__name__}: {error}")
        return commands

    get_commands.__name__ = getattr(original, "__name__", "get_commands")
    get_commands.__qualname__ = getattr(original, "__qualname__", "get_commands")
    get_commands.__doc__ = getattr(original, "__doc__", None)
    get_commands.__wrapped__ = original
    setattr(get_commands, _MARK, True)
    return get_commands


def patch_module(module) -> bool:
    """Wrap `module.get_commands` in place; returns whether the module now carries the wrapper."""
    try:
        original = getattr(module, "get_commands", None)
        if original is None:
            _debug(f"{module.__name__} has no get_commands; TRL's CLI changed, `trl {COMMAND_NAME}` not added")
            return False
        module.get_commands = wrap_get_commands(original)
        return True
    except Exception as error:
        _debug(f"could not patch {getattr(module, '__name__', module)}: {type(error).__name__}: {error}")
        return False


class _PatchingLoader:
    """Delegates to the real loader and patches the module right after it has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        patch_module(module)

    def __getattr__(self, name):  # get_code, get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class TrlCommandsFinder:
    """A `sys.meta_path` finder that only answers for `trl.cli.commands`, and only once."""

    _trl_qrpo_hook = True

    def __init__(self):
        self.done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET_MODULE or self.done:
            return None
        self.done = True
        try:
            spec = None
            for finder in list(sys.meta_path):
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None or getattr(finder, _MARK, False):
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            spec.loader = _PatchingLoader(spec.loader)
            return spec
        except Exception as error:
            _debug(f"finder failed, TRL's CLI is left as is: {type(error).__name__}: {error}")
            return None

    def invalidate_caches(self):
        pass


def install() -> bool:
    """Arrange for `trl qrpo` to exist. Safe to call any number of times; returns False when disabled or failed."""
    try:
        if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
        module = sys.modules.get(TARGET_MODULE)
        if module is not None:  # TRL's CLI already imported (e.g. install() called late): patch in place
            return patch_module(module)
        if not any(getattr(finder, _MARK, False) for finder in sys.meta_path):
            sys.meta_path.insert(0, TrlCommandsFinder())
        return True
    except Exception as error:
        _debug(f"install failed: {type(error).__name__}: {error}")
        return False
