#!/usr/bin/env bash
# The GPU benchmark on a machine without network (the H200 of the device tool): install the carried wheels
# (.whl, made by benchmarks/gpu/fetch_wheels.sh) into a scratch folder, then run benchmarks/gpu/run_h200.py with
# the arguments given here. Results go to $OUT when set (the device tool's folder), else benchmarks/results/gpu.
#
#   bash benchmarks/gpu/run_h200.sh                     # the full run (about 5 minutes on an H200)
#   bash benchmarks/gpu/run_h200.sh --sizes 0.5b --stages steps
#
# Environment: PYTHON (default python3), WHEEL_DIR (default <repo>/.whl), SITE (default /tmp/site).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE=${SITE:-/tmp/site}

shopt -s nullglob
wheels=("$WHEEL_DIR"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "run_h200.sh: no wheels in $WHEEL_DIR: run 'bash benchmarks/gpu/fetch_wheels.sh' on a machine with PyPI" \
        "and name .whl in the device call's carry list" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" ||
    { echo "run_h200.sh: installing ${wheels[*]} into $SITE failed" >&2; exit 3; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
"$PYTHON" benchmarks/gpu/run_h200.py "$@" 2>&1 | tee "$out/run_h200.log"
exit "${PIPESTATUS[0]}"
