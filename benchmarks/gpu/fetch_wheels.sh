#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that a GPU machine without network lacks, into <repo>/.whl (ignored by
# git), so that benchmarks/gpu/run.sh can install them there.
#
#   bash benchmarks/gpu/fetch_wheels.sh                                          # cp312 wheels (Python 3.12)
#   PY_VERSION=3.11 WHEEL_DIR=/tmp/whl311 bash benchmarks/gpu/fetch_wheels.sh   # the same set for Python 3.11
#
# The set assumes an image with torch, accelerate, huggingface_hub, tokenizers, safetensors, numpy, pandas, pyarrow,
# fsspec, xxhash, psutil, pyyaml, jinja2, tqdm and requests, and a transformers older than this package's floor:
# transformers (the version the tests run on), trl, datasets with its two pure-Python dependencies dill and
# multiprocess, and this package. All pure Python: about 15 MiB (transformers 13 MiB), see benchmarks/gpu/README.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
WHEEL_DIR=${WHEEL_DIR:-$REPO/.whl}
# One version of each (two versions of one package stop `pip install .whl/*.whl`). datasets 4.8.0 needs pyarrow>=21,
# as trl does (5.x needs pyarrow>=24, newer than some images have); pyarrow itself (55 MiB) is not carried.
PACKAGES=(transformers==5.24.0 trl==1.16.0 datasets==4.8.0 dill==0.4.1 multiprocess==0.70.19)

rm -rf "$WHEEL_DIR"
mkdir -p "$WHEEL_DIR"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux2014_x86_64 -d "$WHEEL_DIR" "${PACKAGES[@]}"

# This package as the working tree has it (tracked and untracked-not-ignored files), built from a copy: the build
# writes build/ and egg-info next to its sources.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    pyproject.toml setup.cfg README.md LICENSE trl_qrpo |
    xargs -0 cp --parents -t "$build")
"$PYTHON" -m pip wheel --no-deps -q -w "$WHEEL_DIR" "$build"

ls -l "$WHEEL_DIR"
du -ch "$WHEEL_DIR"/*.whl | tail -1
