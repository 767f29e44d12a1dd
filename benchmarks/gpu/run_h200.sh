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
# datasets 5.2.0 wants pyarrow >= 24: with an older pyarrow in the image, take the fallback datasets 4.8.0 instead
# (DATASETS_FALLBACK=1 forces it, for a rehearsal).
fallback=("$WHEEL_DIR"/fallback/datasets-*.whl)
if [ ${#fallback[@]} -eq 1 ]; then
    old_arrow=$("$PYTHON" -c 'import importlib.metadata as m; from packaging.version import Version as V
print(int(V(m.version("pyarrow")) < V("24")))' 2>/dev/null || echo 1)
    if [ "${DATASETS_FALLBACK:-0}" = 1 ] || [ "$old_arrow" = 1 ]; then
        echo "run_h200.sh: installing ${fallback[0]##*/} (pyarrow older than 24, or DATASETS_FALLBACK=1)" >&2
        kept=()
        for w in "${wheels[@]}"; do [[ ${w##*/} == datasets-* ]] || kept+=("$w"); done
        wheels=("${kept[@]}" "${fallback[0]}")
    fi
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" ||
    { echo "run_h200.sh: installing ${wheels[*]} into $SITE failed" >&2; exit 3; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# The log goes beside the results: --out-dir when given, else $OUT, else benchmarks/results/gpu.
out=${OUT:-benchmarks/results/gpu}
args=("$@")
for i in "${!args[@]}"; do
    case ${args[$i]} in
        --out-dir) out=${args[$((i + 1))]:-$out} ;;
        --out-dir=*) out=${args[$i]#--out-dir=} ;;
    esac
done
mkdir -p "$out"
"$PYTHON" benchmarks/gpu/run_h200.py "$@" 2>&1 | tee "$out/run_h200.log"
exit "${PIPESTATUS[0]}"
