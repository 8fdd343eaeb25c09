#!/usr/bin/env bash
# Q# end to end on a CPU, offline: synthetic word problems, a tiny pretrained reference that is
# partly right, two rounds of collect -> combine -> train -> eval, against the reference and
# the CD baseline. Writes quickstart_out/summary.json and prints the table.
#   bash scripts/quickstart.sh
# Sizes come from QS_* environment variables (defaults below); QS_MODELS=DIR skips pretraining
# and uses DIR/ref and DIR/classifier; QS_PRETRAIN_ARGS passes flags to utils.demo.pretrain.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${QS_OUT:-quickstart_out}"
SEED="${QS_SEED:-0}"
NUM_TRAIN="${QS_NUM_TRAIN:-768}"
NUM_TEST="${QS_NUM_TEST:-200}"
COLLECT_SAMPLES="${QS_COLLECT_SAMPLES:-4}"
ROUND2_SAMPLES="${QS_ROUND2_SAMPLES:-2}"
EVAL_SAMPLES="${QS_EVAL_SAMPLES:-4}"
MAX_NEW_TOKENS="${QS_MAX_NEW_TOKENS:-96}"
ETA="${QS_ETA:-10}"
EPOCHS="${QS_EPOCHS:-4}"
LR="${QS_LR:-1e-3}"
BATCH="${QS_BATCH:-32}"
DROP_NO_VARIATION="${QS_DROP_NO_VARIATION:-1}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
step() {  # step NAME: prints the elapsed time and records when each step starts in steps.tsv
  echo; echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"
  printf '%s\t%s\n' "$SECONDS" "$*" >> "$OUT/steps.tsv"
}

DATA="$OUT/dataset"
step "synthetic dataset: $NUM_TRAIN train / $NUM_TEST test problems"
python "$REPO/dataset/synthetic.py" --out_dir "$DATA" --num_train "$NUM_TRAIN" --num_test "$NUM_TEST" --seed "$SEED"
if [ -n "${QS_MODELS:-}" ]; then
  MODELS="$QS_MODELS"
else
  MODELS="$OUT/models"
  step "pretraining the reference and the classifier LM"
  # shellcheck disable=SC2086  # QS_PRETRAIN_ARGS: extra flags, e.g. smaller budgets for tests
  python -m utils.demo.pretrain --data_dir "$DATA" --out_dir "$MODELS" --seed "$SEED" ${QS_PRETRAIN_ARGS:-}
fi

MODEL_FLAGS=(--ref_model_id "$MODELS/ref" --classifier_model_id "$MODELS/classifier" --classifier_type V
  --inference_mode bernoulli --loss_type bce --use_bias 0)
TRAIN_DATA=(--data_path "$DATA/synth_train.jsonl" --train_eval_save_path "$DATA/synth_train_eval.json")
TEST_DATA=(--data_path "$DATA/synth_test.jsonl" --train_eval_save_path "$DATA/synth_test_eval.json")
SAMPLING=(--temperature 0.8 --top_p 0.9 --max_new_tokens "$MAX_NEW_TOKENS" --dtype float32)

train() {  # train OUTPUT_DIR DATA_FILE...
  local output_dir=$1; shift
  python "$REPO/train_classifier.py" "${MODEL_FLAGS[@]}" \
    --original_problems_path "$DATA/synth_train.jsonl" --train_eval_save_path "$DATA/synth_train_eval.json" \
    --init_mode zero --dataset_type gsm8k --data_paths "$@" --drop_no_variation "$DROP_NO_VARIATION" --eta "$ETA" \
    --output_dir "$output_dir" --num_epochs "$EPOCHS" --lr "$LR" --batch_size "$BATCH" --dtype float32 \
    --ckpt_freq 100000 --eval_freq 100000 --seed "$SEED" >&2  # logs to stderr: stdout is the checkpoint path
  ls -d "$output_dir"/ckpt_* | sort -V | tail -1
}
evaluate() {  # evaluate CHECKPOINT ETA [extra flags]
  local checkpoint=$1 eta=$2; shift 2
  python "$REPO/eval_ckpt.py" --classifier_ckpt_path "$checkpoint" --eta "$eta" "${TEST_DATA[@]}" \
    --num_samples "$EVAL_SAMPLES" --batch_size 100 --max_new_tokens "$MAX_NEW_TOKENS" --seed "$SEED" "$@"
}

step "round 1: collect with the reference policy"
python "$REPO/collect_training_data.py" --is_first_round 1 "${MODEL_FLAGS[@]}" "${TRAIN_DATA[@]}" --use_chat_template 1 \
  --eta 0 "${SAMPLING[@]}" --num_samples "$COLLECT_SAMPLES" --batch_size 64 --seed "$SEED" --output_dir "$OUT/collected/round1/"
python "$REPO/combine_training_data.py" --data_template_path "$OUT/collected/round1/" "${TRAIN_DATA[@]}"
step "round 1: train"
CKPT1=$(train "$OUT/checkpoints/round1" "$OUT/collected/round1/all_train_data.jsonl")
step "evaluate: reference, CD baseline, Q# round 1"
evaluate "$CKPT1" 0
evaluate "$CKPT1" "$ETA" --cd_baseline 1
evaluate "$CKPT1" "$ETA"

step "round 2: collect guided by the round-1 classifier"
python "$REPO/collect_training_data.py" --is_first_round 0 --classifier_ckpt_path "$CKPT1" --eta "$ETA" "${SAMPLING[@]}" \
  --num_samples "$ROUND2_SAMPLES" --batch_size 64 --seed "$SEED" --output_dir "$OUT/collected/round2/"
python "$REPO/combine_training_data.py" --data_template_path "$OUT/collected/round2/" "${TRAIN_DATA[@]}"
step "round 2: train on both rounds"
CKPT2=$(train "$OUT/checkpoints/round2" "$OUT/collected/round1/all_train_data.jsonl" "$OUT/collected/round2/all_train_data.jsonl")
step "evaluate: Q# round 2"
evaluate "$CKPT2" "$ETA"

ETA_TAG=$(python -c "print(float('$ETA'))")  # output names spell eta as a float
TAG="top_k_20_temp_0.8"
step "summary ($((SECONDS / 60)) min $((SECONDS % 60)) s)"
python "$REPO/scripts/summarize_quickstart.py" --out "$OUT/summary.json" --seed "$SEED" --steps "$OUT/steps.tsv" \
  --row "reference=$CKPT1/reward_stats_eta_0.0_${TAG}.json" \
  --row "cd=$CKPT1/reward_stats_eta_${ETA_TAG}_${TAG}_cd.json" \
  --row "qsharp_round1=$CKPT1/reward_stats_eta_${ETA_TAG}_${TAG}.json" \
  --row "qsharp_round2=$CKPT2/reward_stats_eta_${ETA_TAG}_${TAG}.json"
