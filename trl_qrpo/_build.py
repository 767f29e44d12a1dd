"""Build step (setuptools `build_py`) that ships the `trl qrpo` start-up hook; used at build time only.

pyproject.toml points `[tool.setuptools.cmdclass] build_py` here. Besides the normal `build_py` work it writes
`trl_qrpo_hook.pth` at the root of the wheel (site-packages), whose one `import` line loads
`trl_qrpo/_trl_hook.py` by path and calls its `install()`; see `trl_qrpo/cli.py` for why.

- Regular builds (`pip install .`, `python -m build`): the file goes to `build_lib`, whose whole tree becomes the
  wheel's purelib root.
- Editable builds (`pip install -e .`, PEP 660): setuptools does not put `build_py` outputs in the editable wheel
  (it maps packages to the source tree instead), but it writes non-editable files straight into the unpacked wheel,
  which is the `install` command's `install_lib` during `editable_wheel`. The `.pth` goes there. The `.pth` sorts
  after setuptools' own `__editable__.*.pth` (``_`` < ``t``), so the editable finder is already active when our
  line asks where `trl_qrpo` lives.

Both builds are checked by tests/test_cli_hook.py (wheel contents) and tests/test_cli.py (installed `trl qrpo`).
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py as _build_py

PTH_NAME = "trl_qrpo_hook.pth"

# One line, as `site` requires for executable .pth lines. It finds the package without importing it (find_spec of a
# top-level name runs no package code), executes `_trl_hook.py` under a private module name and installs the hook.
# Any failure is swallowed: a broken or half-removed install must never break Python start-up.
PTH_LINE = (
    "import sys; exec("
    + repr(
        "try:\n"
        "    import importlib.util as _u\n"
        "    _s = _u.find_spec('trl_qrpo')\n"
        "    if _s is not None and _s.submodule_search_locations and '_trl_qrpo_hook' not in sys.modules:\n"
        "        import os as _os\n"
        "        _p = _os.path.join(list(_s.submodule_search_locations)[0], '_trl_hook.py')\n"
        "        _h = _u.spec_from_file_location('_trl_qrpo_hook', _p)\n"
        "        _m = _u.module_from_spec(_h)\n"
        "        _h.loader.exec_module(_m)\n"
        "        sys.modules['_trl_qrpo_hook'] = _m\n"
        "        _m.install()\n"
        "except Exception:\n"
        "    pass\n"
    )
    + ")\n"
)


class build_py(_build_py):  # noqa: N801 (setuptools command naming)
    """`build_py` that also writes the `trl qrpo` start-up hook (`trl_qrpo_hook.pth`) at the wheel root."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            target_dir = self.get_finalized_command("install").install_lib
        else:
            target_dir = self.build_lib
        if not target_dir:
            return
        os.makedirs(target_dir, exist_ok=True)
        with open(os.path.join(target_dir, PTH_NAME), "w", encoding="utf-8") as handle:
            handle.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode=include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs
