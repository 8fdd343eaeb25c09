#!/usr/bin/env bash
# Q# with a real instruct model on real GSM8K, on a CPU, offline apart from the package index:
# SmolLM2-135M-Instruct (fine-tuned to box its answers, see utils/real_sft.py) is the reference,
# its first 6 layers the classifier LM. One round: collect, combine, train V/bce, then evaluate
# the reference (eta 0), the CD baseline and Q# on the same GSM8K test problems.
#   python -m utils.real_models --out_dir models/ --sft 1   # once (the demo runs it if needed)
#   bash scripts/real_model_demo.sh
# Sizes come from DEMO_* environment variables (defaults below: about 30 min on 2 cores).
# Writes real_demo_out/summary.json and prints the table with 95% intervals and each stage's time.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${DEMO_OUT:-real_demo_out}"
MODELS="${DEMO_MODELS:-models}"
SEED="${DEMO_SEED:-0}"
NUM_TRAIN="${DEMO_NUM_TRAIN:-32}"
NUM_TEST="${DEMO_NUM_TEST:-24}"
COLLECT_SAMPLES="${DEMO_COLLECT_SAMPLES:-2}"
EVAL_SAMPLES="${DEMO_EVAL_SAMPLES:-4}"
MAX_NEW_TOKENS="${DEMO_MAX_NEW_TOKENS:-160}"
ETA="${DEMO_ETA:-10}"
BATCH="${DEMO_BATCH:-32}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
LAST=$SECONDS
step() { echo; echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }
took() { echo "-- $1: $((SECONDS - LAST)) s"; LAST=$SECONDS; }

step "models: SmolLM2-135M-Instruct, its 6-layer cut, the boxed-answer fine-tune"
python -m utils.real_models --out_dir "$MODELS" --sft 1 --sft_data "$REPO/../shared/datasets/raw/gsm8k/train.jsonl"
took models
REF="$MODELS/smollm2-135m-instruct-sft"
CLS="$MODELS/smollm2-135m-instruct-l6"

DATA="$OUT/dataset"
step "GSM8K from ../shared/datasets"
python "$REPO/dataset/prepare_data.py" --raw_dir "$REPO/../shared/datasets/raw" --splits_dir "$REPO/../shared/datasets/splits" \
  --datasets gsm8k --out_dir "$DATA"
took data

MODEL_FLAGS=(--ref_model_id "$REF" --classifier_model_id "$CLS" --classifier_type V --inference_mode bernoulli
  --loss_type bce --use_bias 0)
TRAIN_DATA=(--data_path "$DATA/gsm8k_train.jsonl" --train_eval_save_path "$DATA/gsm8k_train_eval.json")
SAMPLING=(--temperature 0.8 --top_p 0.9 --max_new_tokens "$MAX_NEW_TOKENS" --dtype float32)

step "collect with the reference policy: $NUM_TRAIN train problems x $COLLECT_SAMPLES"
python "$REPO/collect_training_data.py" --start_index 0 --end_index "$NUM_TRAIN" --is_first_round 1 "${MODEL_FLAGS[@]}" \
  "${TRAIN_DATA[@]}" --use_chat_template 1 --eta 0 "${SAMPLING[@]}" --num_samples "$COLLECT_SAMPLES" \
  --batch_size "$BATCH" --seed "$SEED" --output_dir "$OUT/collected/round1/"
python "$REPO/combine_training_data.py" --data_template_path "$OUT/collected/round1/" "${TRAIN_DATA[@]}"
took collect

step "train V / bce on the 6-layer cut"
python "$REPO/train_classifier.py" "${MODEL_FLAGS[@]}" --original_problems_path "$DATA/gsm8k_train.jsonl" \
  --train_eval_save_path "$DATA/gsm8k_train_eval.json" --init_mode zero --dataset_type gsm8k \
  --data_paths "$OUT/collected/round1/all_train_data.jsonl" --drop_no_variation 0 --eta "$ETA" \
  --output_dir "$OUT/checkpoints/round1" --num_epochs 2 --lr 1e-4 --batch_size 8 --dtype float32 \
  --ckpt_freq 100000 --eval_freq 100000 --seed "$SEED"
CKPT=$(ls -d "$OUT"/checkpoints/round1/ckpt_* | sort -V | tail -1)
took train

evaluate() {  # evaluate ETA NAME [extra flags]
  local eta=$1 name=$2; shift 2
  step "evaluate $name on $NUM_TEST GSM8K test problems x $EVAL_SAMPLES"
  python "$REPO/eval_ckpt.py" --classifier_ckpt_path "$CKPT" --eta "$eta" --data_path "$DATA/gsm8k_test.jsonl" \
    --train_eval_save_path "$DATA/gsm8k_test_eval.json" --end_index "$NUM_TEST" --num_samples "$EVAL_SAMPLES" \
    --batch_size "$BATCH" --max_new_tokens "$MAX_NEW_TOKENS" --seed "$SEED" "$@"
  took "eval $name"
}
evaluate 0 reference
evaluate "$ETA" CD --cd_baseline 1
evaluate "$ETA" "Q#"

ETA_TAG=$(python -c "print(float('$ETA'))")  # output names spell eta as a float
TAG="top_k_20_temp_0.8"
step "summary ($((SECONDS / 60)) min $((SECONDS % 60)) s in all)"
python "$REPO/scripts/summarize_quickstart.py" --out "$OUT/summary.json" \
  --row "reference=$CKPT/reward_stats_eta_0.0_${TAG}.json" \
  --row "cd=$CKPT/reward_stats_eta_${ETA_TAG}_${TAG}_cd.json" \
  --row "qsharp=$CKPT/reward_stats_eta_${ETA_TAG}_${TAG}.json"
