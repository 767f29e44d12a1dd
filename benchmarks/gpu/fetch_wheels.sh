#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that the H200 image lacks, into <repo>/.whl (ignored by git), so that
# benchmarks/gpu/run_h200.sh can install them there (no network on that machine).
#
#   bash benchmarks/gpu/fetch_wheels.sh                 # cp312 set for the H200 (Python 3.12)
#   PY_VERSION=3.11 WHEEL_DIR=/tmp/whl311 bash benchmarks/gpu/fetch_wheels.sh   # same set for a local 3.11 rehearsal
#
# What the image already has (KINDS.md, checked 2026-11): torch 2.11, transformers 5.17.0, accelerate 1.15.0,
# huggingface_hub 1.33.0, tokenizers, safetensors, numpy, pandas, pyarrow, fsspec, xxhash, psutil, pyyaml, jinja2,
# tqdm, requests, scipy. Missing: trl, datasets and the two datasets dependencies dill and multiprocess; and this
# package. Every wheel here is pure Python (about 2 MiB in all): pyarrow (55 MiB) and transformers (12 MiB) are not
# carried, the image's are used (see benchmarks/gpu/README.md for the version checks behind that).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
WHEEL_DIR=${WHEEL_DIR:-$REPO/.whl}
# One version of each: two versions of one package stop the whole `pip install .whl/*.whl` there.
# datasets 5.2.0 (the version tested here) needs pyarrow>=24 and fsspec<=2026.9.0 from the image (the run lists what
# is unmet under environment.unmet_requirements of its JSON); DATASETS_VERSION=... picks another one.
PACKAGES=(trl==1.16.0 "datasets==${DATASETS_VERSION:-5.2.0}" dill==0.4.1 multiprocess==0.70.19)

exclude="$REPO/.git/info/exclude"
if [ -d "$REPO/.git/info" ] && ! grep -qxF '/.whl/' "$exclude" 2>/dev/null; then
    echo '/.whl/' >>"$exclude"
fi

rm -rf "$WHEEL_DIR"
mkdir -p "$WHEEL_DIR"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEEL_DIR" "${PACKAGES[@]}"

# A fallback datasets for an image whose pyarrow is older than datasets 5.2.0 wants (>= 24): run_h200.sh installs it
# instead of .whl/datasets-*.whl there (datasets 4.8.0 needs pyarrow >= 21). Outside the .whl/*.whl glob on purpose.
if [ -z "${DATASETS_VERSION:-}" ]; then
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        -d "$WHEEL_DIR/fallback" datasets==4.8.0
fi

# This package as the working tree has it (tracked and untracked-not-ignored files), built from a copy: the build
# writes build/ and egg-info next to its sources.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    pyproject.toml setup.cfg README.md LICENSE trl_qrpo |
    xargs -0 cp --parents -t "$build")
"$PYTHON" -m pip wheel --no-deps -q -w "$WHEEL_DIR" "$build"

echo "wheels in $WHEEL_DIR:"
ls -lR "$WHEEL_DIR"
du -ch "$WHEEL_DIR"/*.whl "$WHEEL_DIR"/fallback/*.whl 2>/dev/null | tail -1
