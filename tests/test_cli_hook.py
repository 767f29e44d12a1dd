"""The start-up hook that gives TRL's CLI a `qrpo` command (trl_qrpo/_trl_hook.py, trl_qrpo/_build.py).

In-process: the `get_commands` wrapper and the import-time finder, on a stand-in module. Subprocesses: the `.pth`
line itself (with `python -S`, so nothing installed interferes), its failure modes, the wheel and editable wheel that
setuptools builds, and a real `pip install` of the wheel into a fresh virtual environment and its uninstall.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("setuptools", reason="the build step (trl_qrpo/_build.py) and the wheel builds need setuptools")

from trl_qrpo import _trl_hook  # noqa: E402
from trl_qrpo._build import PTH_LINE, PTH_NAME  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PURELIB = sysconfig.get_paths()["purelib"]


class _Command:
    def __init__(self, name):
        self.name = name


def _trl_commands():
    return [_Command("dpo"), _Command("env")]


# ---------------------------------------------------------------------------------------- the get_commands wrapper


def test_wrapper_appends_qrpo_and_is_idempotent():
    from trl_qrpo.cli import QRPOCommand

    wrapped = _trl_hook.wrap_get_commands(_trl_commands)
    commands = wrapped()
    assert [c.name for c in commands] == ["dpo", "env", "qrpo"]
    assert isinstance(commands[-1], QRPOCommand)
    assert _trl_hook.wrap_get_commands(wrapped) is wrapped
    assert wrapped.__wrapped__ is _trl_commands and wrapped.__name__ == "_trl_commands"


def test_wrapper_steps_aside_when_trl_has_a_qrpo_command():
    def with_qrpo():
        return [_Command("dpo"), _Command("qrpo")]

    commands = _trl_hook.wrap_get_commands(with_qrpo)()
    assert [c.name for c in commands] == ["dpo", "qrpo"] and not hasattr(commands[1], "register")


def test_wrapper_falls_back_to_trls_list_on_any_error(monkeypatch, capsys):
    def broken():
        raise ImportError("trl_qrpo.cli is broken")

    monkeypatch.setattr(_trl_hook, "_make_qrpo_command", broken)
    assert [c.name for c in _trl_hook.wrap_get_commands(_trl_commands)()] == ["dpo", "env"]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(_trl_hook.DEBUG_ENV, "1")
    _trl_hook.wrap_get_commands(_trl_commands)()
    assert "trl_qrpo.cli is broken" in capsys.readouterr().err


class EnvCommand(_Command):  # the class name TRL's `env` command has
    help_text = "Print the environment information"


def test_wrapper_swaps_trls_env_command_for_one_that_reports_trl_qrpo():
    from trl.cli.commands.env import EnvCommand as TrlEnvCommand

    from trl_qrpo.cli import QRPOEnvCommand

    commands = _trl_hook.wrap_get_commands(lambda: [_Command("dpo"), EnvCommand("env")])()
    assert [c.name for c in commands] == ["dpo", "env", "qrpo"]
    assert isinstance(commands[1], QRPOEnvCommand) and commands[1].help_text == EnvCommand.help_text
    assert TrlEnvCommand.__name__ == "EnvCommand", "the name the hook recognises TRL's command by"
    other_env = _Command("env")  # some other `env` command: not ours to replace
    assert _trl_hook.wrap_get_commands(lambda: [other_env])()[0] is other_env


def test_env_swap_falls_back_to_trls_command_on_any_error(monkeypatch):
    def broken(original):
        raise ImportError("no QRPOEnvCommand")

    monkeypatch.setattr(_trl_hook, "_make_env_command", broken)
    trls = EnvCommand("env")
    commands = _trl_hook.wrap_get_commands(lambda: [trls])()
    assert commands[0] is trls and [c.name for c in commands] == ["env", "qrpo"], "`qrpo` is still added"


# --------------------------------------------------------------------------------------------- the import finder


@pytest.fixture
def fake_trl(tmp_path, monkeypatch):
    """A stand-in for trl.cli.commands (a package module with get_commands) and a private sys.meta_path."""
    package = tmp_path / "fake_trl_cli"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "commands.py").write_text(
        "class C:\n    def __init__(self, name):\n        self.name = name\n\n"
        "def get_commands():\n    '''TRL's list.'''\n    return [C('dpo'), C('env')]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_trl_hook, "TARGET_MODULE", "fake_trl_cli.commands")
    # without the finder that the installed hook put there at start-up
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not getattr(f, "_trl_qrpo_hook", False)])
    for name in ("fake_trl_cli", "fake_trl_cli.commands"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return package


def test_finder_patches_the_module_when_it_is_imported(fake_trl):
    import importlib

    assert _trl_hook.install()
    assert _trl_hook.install(), "a second install adds no second finder"
    assert sum(getattr(f, "_trl_qrpo_hook", False) for f in sys.meta_path) == 1
    assert "fake_trl_cli.commands" not in sys.modules
    module = importlib.import_module("fake_trl_cli.commands")
    assert [c.name for c in module.get_commands()] == ["dpo", "env", "qrpo"]
    assert module.get_commands.__doc__ == "TRL's list."
    assert "def get_commands" in module.__spec__.loader.get_source("fake_trl_cli.commands"), "loader delegates"
    finder = next(f for f in sys.meta_path if getattr(f, "_trl_qrpo_hook", False))
    assert finder.done and finder.find_spec("fake_trl_cli.commands") is None, "inert after its one answer"


def test_install_patches_in_place_when_trls_cli_is_already_imported(fake_trl):
    import importlib

    module = importlib.import_module("fake_trl_cli.commands")
    assert [c.name for c in module.get_commands()] == ["dpo", "env"]
    assert _trl_hook.install()
    assert [c.name for c in module.get_commands()] == ["dpo", "env", "qrpo"]


def test_install_can_be_switched_off(fake_trl, monkeypatch):
    import importlib

    monkeypatch.setenv(_trl_hook.DISABLE_ENV, "1")
    assert not _trl_hook.install()
    assert not any(getattr(f, "_trl_qrpo_hook", False) for f in sys.meta_path)
    assert [c.name for c in importlib.import_module("fake_trl_cli.commands").get_commands()] == ["dpo", "env"]


# ------------------------------------------------------------------------------------ the .pth line, for real


def _python_without_site(code: str, pythonpath: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """Run `code` after the .pth line, in `python -S` (no site-packages processing, no installed hook)."""
    return subprocess.run(
        [sys.executable, "-S", "-c", f"import sys\nexec({PTH_LINE!r})\n{code}"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_pth_line_installs_the_hook_without_importing_anything_heavy(tmp_path):
    code = (
        "print(sorted(m for m in ('_trl_qrpo_hook', 'trl_qrpo', 'trl', 'torch') if m in sys.modules))\n"
        "from trl.cli.main import main\n"
        "sys.argv[0] = 'trl'\n"
        "main(['--help'])\n"
    )
    result = _python_without_site(code, [str(REPO), PURELIB], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "['_trl_qrpo_hook']"
    assert ",qrpo}" in result.stdout and "Run the QRPO training script" in result.stdout


@pytest.mark.slow
def test_pth_line_is_silent_when_the_package_is_gone_or_broken(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # The package is not importable at all (e.g. a .pth left behind): nothing happens, nothing is printed.
    result = _python_without_site("print('_trl_qrpo_hook' in sys.modules)", [str(tmp_path)], cwd=cwd)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "False", "")

    # The package is there but `trl_qrpo.cli` cannot be imported: `trl` works, without `qrpo`.
    broken = tmp_path / "trl_qrpo"
    broken.mkdir()
    shutil.copy(REPO / "trl_qrpo" / "_trl_hook.py", broken / "_trl_hook.py")
    (broken / "__init__.py").write_text("")
    (broken / "cli.py").write_text("raise ImportError('cannot import trl_qrpo.cli')\n")
    code = "from trl.cli.main import main\nsys.argv[0] = 'trl'\nmain(['--help'])\n"
    result = _python_without_site(code, [str(tmp_path), PURELIB], cwd=cwd, **{_trl_hook.DEBUG_ENV: "1"})
    assert result.returncode == 0, result.stderr
    assert "{distillation,dpo," in result.stdout and "qrpo" not in result.stdout
    assert "cannot import trl_qrpo.cli" in result.stderr


# ------------------------------------------------------------------------------------------- built wheels


@pytest.fixture(scope="module")
def built_wheels(tmp_path_factory):
    """The wheel and the editable wheel that `pip install .` / `pip install -e .` build, from a copy of the repo."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    if not (source / "README.md").exists():
        (source / "README.md").write_text("trl-qrpo\n")
    shutil.copytree(REPO / "trl_qrpo", source / "trl_qrpo", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheels")
    code = (
        "import sys\nfrom setuptools import build_meta as backend\n"
        f"print('WHEEL', backend.build_wheel({str(out / 'regular')!r}))\n"
        f"print('WHEEL', backend.build_editable({str(out / 'editable')!r}))\n"
    )
    (out / "regular").mkdir()
    (out / "editable").mkdir()
    result = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    regular, editable = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("WHEEL ")]
    return out / "regular" / regular, out / "editable" / editable


@pytest.mark.slow
def test_wheel_ships_the_hook_at_the_site_packages_root(built_wheels):
    regular, _ = built_wheels
    with zipfile.ZipFile(regular) as wheel:
        names = set(wheel.namelist())
        assert PTH_NAME in names, "the .pth must sit at the wheel root (site-packages)"
        assert wheel.read(PTH_NAME).decode() == PTH_LINE
        assert {"trl_qrpo/_trl_hook.py", "trl_qrpo/cli.py", "trl_qrpo/scripts/qrpo.py"} <= names
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        assert f"{PTH_NAME}," in wheel.read(f"{dist_info}/RECORD").decode(), "recorded, so pip uninstall removes it"
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        assert "trl-qrpo = trl_qrpo.cli:main" in entry_points


@pytest.mark.slow
def test_editable_wheel_ships_the_hook_after_setuptools_finder(built_wheels):
    _, editable = built_wheels
    with zipfile.ZipFile(editable) as wheel:
        names = wheel.namelist()
        assert PTH_NAME in names and wheel.read(PTH_NAME).decode() == PTH_LINE
        (setuptools_pth,) = [n for n in names if n.startswith("__editable__") and n.endswith(".pth")]
        assert sorted([PTH_NAME, setuptools_pth]) == [setuptools_pth, PTH_NAME], "site reads .pth files sorted"


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_trl_qrpo_and_uninstall_removes_it(built_wheels, tmp_path):
    regular, _ = built_wheels
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # TRL, torch & co. come from this environment as a plain path entry (its own .pth files are not processed).
    (site_packages / "zz_dependencies.pth").write_text(PURELIB + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    install = subprocess.run(
        # --ignore-installed: the environment running the tests may hold trl-qrpo itself (CI installs the wheel), and
        # pip would see it through the path entry above and call the requirement already satisfied.
        [*pip, "install", "--no-deps", "--no-index", "--ignore-installed", str(regular)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    assert (site_packages / PTH_NAME).is_file() and (venv / "bin" / "trl-qrpo").is_file()

    trl = [python, "-c", "import sys; from trl.cli import main; sys.argv[0] = 'trl'; sys.exit(main())"]
    result = subprocess.run([*trl, "qrpo", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: trl qrpo ") and "  --transform " in result.stdout
    origin = subprocess.run(
        [python, "-c", "import trl_qrpo; print(trl_qrpo.__file__)"], cwd=tmp_path, capture_output=True, text=True
    )
    assert origin.stdout.strip().startswith(str(site_packages)), "the installed copy, not the checkout"

    uninstall = subprocess.run([*pip, "uninstall", "-y", "trl-qrpo"], capture_output=True, text=True)
    assert uninstall.returncode == 0, uninstall.stderr
    assert not (site_packages / PTH_NAME).exists()
    result = subprocess.run([*trl, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "" and "qrpo" not in result.stdout
