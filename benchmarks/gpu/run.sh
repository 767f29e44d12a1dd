#!/usr/bin/env bash
# The benchmarks on one GPU: bench_train_step.py, bench_precompute.py and bench_generation.py with --device cuda
# --dtype bfloat16, on random-init Llama models of 0.5B and 1.5B parameters, one size after the other (a run cut
# short keeps what it finished). Results (<benchmark>-<size>.json and .png) and run.log go to OUT_DIR.
#
#   bash benchmarks/gpu/run.sh OUT_DIR
#   SIZES=0.5b bash benchmarks/gpu/run.sh OUT_DIR      # one size (about 5-6 minutes on an H200, an estimate)
#   DEVICE=cpu SIZES=tiny TRAIN_ARGS=--smoke GEN_ARGS=--smoke bash benchmarks/gpu/run.sh OUT_DIR   # CPU rehearsal
#
# Wheels found in WHEEL_DIR (default <repo>/.whl, made by benchmarks/gpu/fetch_wheels.sh for a machine without
# network) are installed first into a scratch folder that goes first on PYTHONPATH; without wheels, the installed
# packages are used. Environment: PYTHON (python3), DEVICE (cuda), DTYPE (bfloat16), SIZES ("0.5b 1.5b"),
# TRAIN_ARGS and GEN_ARGS (the workloads below), WHEEL_DIR, SITE (default: a new temporary folder).
set -uo pipefail
if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/gpu/run.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd) || exit 2
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}

shopt -s nullglob
wheels=("$WHEEL_DIR"/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    SITE=${SITE:-$(mktemp -d)}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" || { echo "run.sh: installing ${wheels[*]} into $SITE failed" >&2; exit 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

# Training: 8 pairs = 16 sequences of about 370 tokens per step, 16 timed rounds after 3 warm-up rounds.
read -r -a train <<<"${TRAIN_ARGS---batch-pairs 8 --prompt-words 96 --completion-words 192 --steps 16 --warmup 3}"
# Generation: 16 prompts x 4 samples of up to 256 tokens, 64 sequences per generate call (transformers only).
read -r -a gen <<<"${GEN_ARGS---prompts 16 --prompt-words 48 --num-generations 4 --max-new-tokens 256 --batch-size 64}"
device=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --out-dir "$out")

"$PYTHON" -c 'import platform, torch, transformers, trl, datasets, trl_qrpo
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "trl", trl.__version__, "datasets", datasets.__version__,
      "trl_qrpo", trl_qrpo.__file__)' 2>&1 | tee "$out/run.log"
status=0
for size in ${SIZES:-0.5b 1.5b}; do
    for bench in train_step precompute generation; do
        args=("${train[@]}")
        [ "$bench" = generation ] && args=("${gen[@]}" --backends transformers)
        echo "== $bench $size" | tee -a "$out/run.log"
        "$PYTHON" "benchmarks/bench_$bench.py" "${device[@]}" --sizes "$size" --name "$bench-$size" "${args[@]}" \
            2>&1 | tee -a "$out/run.log"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
done
exit "$status"
