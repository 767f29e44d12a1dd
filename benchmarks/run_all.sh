#!/usr/bin/env bash
# Run every benchmark with its defaults (12 minutes on 2 idle cores; 2-6x longer when shared), print each table.
# Results land in benchmarks/results/<name>.json and .png. Extra arguments go to every script (e.g. --smoke).
# Measure on a quiet machine: the scripts record the load average they ran under, and other processes on the
# CPU inflate and scatter the step times (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" benchmarks/bench_targets.py "$@"
"$PYTHON" benchmarks/bench_train_step.py "$@"
"$PYTHON" benchmarks/bench_precompute.py "$@"
"$PYTHON" benchmarks/bench_generation.py "$@"
"$PYTHON" benchmarks/report.py
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
