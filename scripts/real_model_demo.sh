#!/usr/bin/env bash
# Q# with a real instruct model, on a CPU, offline apart from the package index: SmolLM2-135M-
# Instruct, fine-tuned to box its answers (utils/demo/real_sft.py), is the reference, its first 6
# layers the classifier LM. One round: collect, combine, train V/bce, then evaluate the reference
# (eta 0), the CD baseline and Q# on the same test problems.
#   python -m utils.real_models --out_dir models/ --sft 1   # once (the demo runs it if needed)
#   bash scripts/real_model_demo.sh                         # DEMO_DATA=synthetic (default) or gsm8k
# DEMO_DATA=synthetic: the quickstart's problems with traps, and the reference fine-tuned on
# others like them (pass@1 about 27%). DEMO_DATA=gsm8k: real GSM8K, and the reference fine-tuned
# on GSM8K train for the format only (pass@1 about 3%: at 135M parameters GSM8K leaves guidance
# almost no signal). Sizes come from DEMO_* environment variables (defaults below fit 30 min on
# 2 cores). Writes $DEMO_OUT/summary.json and prints the table with 95% intervals and each
# stage's time.
# DEMO_ENGINE picks the decoding engine of collection and evaluation (continuous, the default;
# generate; vllm, after pip install -r requirements-vllm.txt). DEMO_ETAS sweeps Q# and CD from
# the same classifier over several etas (DEMO_ETA among them) and writes the frontier, pass@1
# against KL with 95% intervals, to $DEMO_OUT/frontier/ (results.csv, pass1_vs_kl.png); with
# DEMO_ENGINE=vllm it defaults to "1 3 10 30" on 192 test problems, else to DEMO_ETA alone.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${DEMO_OUT:-real_demo_out}"  # a folder per dataset: DEMO_OUT=real_demo_gsm8k DEMO_DATA=gsm8k ...
MODELS="${DEMO_MODELS:-models}"
SEED="${DEMO_SEED:-0}"
DEMO_DATA="${DEMO_DATA:-synthetic}"
ENGINE="${DEMO_ENGINE:-continuous}"
case "$ENGINE" in
  continuous|generate) TEST_SCALE=1 ;;
  vllm) TEST_SCALE=3 ;;  # vLLM's speed buys a sweep on 3x the test problems
  *) echo "error: DEMO_ENGINE=$ENGINE; valid: continuous, generate, vllm" >&2; exit 2 ;;
esac
case "$DEMO_DATA" in  # sizes per dataset: GSM8K responses are about 3x longer
  synthetic) N_TRAIN=128 N_TEST=$((64 * TEST_SCALE)) TOKENS=96 ;;
  gsm8k) N_TRAIN=32 N_TEST=$((24 * TEST_SCALE)) TOKENS=160 ;;
  *) echo "error: DEMO_DATA=$DEMO_DATA; valid: synthetic, gsm8k" >&2; exit 2 ;;
esac
NUM_TRAIN="${DEMO_NUM_TRAIN:-$N_TRAIN}"
NUM_TEST="${DEMO_NUM_TEST:-$N_TEST}"
COLLECT_SAMPLES="${DEMO_COLLECT_SAMPLES:-2}"
EVAL_SAMPLES="${DEMO_EVAL_SAMPLES:-4}"
MAX_NEW_TOKENS="${DEMO_MAX_NEW_TOKENS:-$TOKENS}"
ETA="${DEMO_ETA:-10}"
if [ "$ENGINE" = vllm ]; then ETAS="${DEMO_ETAS:-1 3 10 30}"; else ETAS="${DEMO_ETAS:-$ETA}"; fi
case " $ETAS " in *" $ETA "*) ;; *) echo "error: DEMO_ETAS=\"$ETAS\" must include DEMO_ETA=$ETA" >&2; exit 2 ;; esac
BATCH="${DEMO_BATCH:-32}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
LAST=$SECONDS
step() { echo; echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }
took() { echo "-- $1: $((SECONDS - LAST)) s"; LAST=$SECONDS; }

step "models: SmolLM2-135M-Instruct, its 6-layer cut, the boxed-answer fine-tune ($DEMO_DATA)"
python -m utils.real_models --out_dir "$MODELS" --sft 1 --sft_source "$DEMO_DATA"
took models
REF="$MODELS/smollm2-135m-instruct-sft-$DEMO_DATA"
CLS="$MODELS/smollm2-135m-instruct-l6"

DATA="$OUT/dataset"
if [ "$DEMO_DATA" = synthetic ]; then
  step "synthetic problems (dataset/synthetic.py, seed 0: none of them in the fine-tune)"
  python "$REPO/dataset/synthetic.py" --out_dir "$DATA" --num_train "$NUM_TRAIN" --num_test 500 --seed 0
  PREFIX=synth
else
  step "GSM8K from ../shared/datasets"
  python "$REPO/dataset/prepare_data.py" --raw_dir "$REPO/../shared/datasets/raw" \
    --splits_dir "$REPO/../shared/datasets/splits" --datasets gsm8k --out_dir "$DATA"
  PREFIX=gsm8k
fi
took data

MODEL_FLAGS=(--ref_model_id "$REF" --classifier_model_id "$CLS" --classifier_type V --inference_mode bernoulli
  --loss_type bce --use_bias 0)
TRAIN_DATA=(--data_path "$DATA/${PREFIX}_train.jsonl" --train_eval_save_path "$DATA/${PREFIX}_train_eval.json")
ENGINE_FLAGS=(--engine "$ENGINE")
# vLLM on a CPU takes 90% of the free memory for its KV cache unless told: 4 GiB is plenty here
if [ "$ENGINE" = vllm ]; then ENGINE_FLAGS+=(--vllm_kv_cache_gib "${DEMO_VLLM_KV_CACHE_GIB:-4}"); fi
SAMPLING=(--temperature 0.8 --top_p 0.9 --max_new_tokens "$MAX_NEW_TOKENS" --dtype float32 "${ENGINE_FLAGS[@]}")

step "collect with the reference policy: $NUM_TRAIN train problems x $COLLECT_SAMPLES"
python "$REPO/collect_training_data.py" --start_index 0 --end_index "$NUM_TRAIN" --is_first_round 1 "${MODEL_FLAGS[@]}" \
  "${TRAIN_DATA[@]}" --use_chat_template 1 --eta 0 "${SAMPLING[@]}" --num_samples "$COLLECT_SAMPLES" \
  --batch_size "$BATCH" --seed "$SEED" --output_dir "$OUT/collected/round1/"
python "$REPO/combine_training_data.py" --data_template_path "$OUT/collected/round1/" "${TRAIN_DATA[@]}"
took collect

step "train V / bce on the 6-layer cut"
python "$REPO/train_classifier.py" "${MODEL_FLAGS[@]}" --original_problems_path "$DATA/${PREFIX}_train.jsonl" \
  --train_eval_save_path "$DATA/${PREFIX}_train_eval.json" --init_mode zero --dataset_type gsm8k \
  --data_paths "$OUT/collected/round1/all_train_data.jsonl" --drop_no_variation 0 --eta "$ETA" \
  --output_dir "$OUT/checkpoints/round1" --num_epochs 2 --lr 1e-4 --batch_size 8 --dtype float32 \
  --ckpt_freq 100000 --eval_freq 100000 --seed "$SEED"
CKPT=$(ls -d "$OUT"/checkpoints/round1/ckpt_* | sort -V | tail -1)
took train

evaluate() {  # evaluate "ETAS" NAME [extra flags]: one command per method, the models loaded once
  local etas=$1 name=$2; shift 2
  step "evaluate $name (eta $etas) on $NUM_TEST $DEMO_DATA test problems x $EVAL_SAMPLES"
  # shellcheck disable=SC2086  # $etas: one argument per eta
  python "$REPO/eval_ckpt.py" --classifier_ckpt_path "$CKPT" --eta $etas --data_path "$DATA/${PREFIX}_test.jsonl" \
    --train_eval_save_path "$DATA/${PREFIX}_test_eval.json" --end_index "$NUM_TEST" --num_samples "$EVAL_SAMPLES" \
    --batch_size "$BATCH" --max_new_tokens "$MAX_NEW_TOKENS" --seed "$SEED" "${ENGINE_FLAGS[@]}" "$@"
  took "eval $name"
}
evaluate "0 $ETAS" "reference and Q#"
evaluate "$ETAS" CD --cd_baseline 1
if [ "$ETAS" != "$ETA" ]; then
  step "frontier: Q# and CD, pass@1 against KL"
  python -m utils.demo.report "$CKPT" --out_dir "$OUT/frontier"
fi

ETA_TAG=$(python -c "print(float('$ETA'))")  # output names spell eta as a float
TAG="top_k_20_temp_0.8"
step "summary ($((SECONDS / 60)) min $((SECONDS % 60)) s in all)"
python "$REPO/scripts/summarize_quickstart.py" --out "$OUT/summary.json" \
  --row "reference=$CKPT/reward_stats_eta_0.0_${TAG}.json" \
  --row "cd=$CKPT/reward_stats_eta_${ETA_TAG}_${TAG}_cd.json" \
  --row "qsharp=$CKPT/reward_stats_eta_${ETA_TAG}_${TAG}.json"
