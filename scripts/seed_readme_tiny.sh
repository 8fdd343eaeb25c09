#!/usr/bin/env bash
# The seed README's four commands, as written, on the local tiny models (no network, no GPU):
# model ids -> tiny_models/{ref,classifier}; short generations; a dozen training problems;
# --drop_no_variation 0 because random tiny models never solve anything (so every reward
# is 0). Prints each stage's wall time.
#   bash scripts/seed_readme_tiny.sh [WORKDIR]   (default: tiny_run/)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-tiny_run}"
SHARED="$REPO/../shared/datasets"
mkdir -p "$WORK" && cd "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "[time] $name: $((SECONDS - t0)) s"; }

if [ -d "$SHARED/raw" ]; then
  timed prepare_data python "$REPO/dataset/prepare_data.py" --raw_dir "$SHARED/raw" --splits_dir "$SHARED/splits" --datasets gsm8k --out_dir dataset
else
  timed prepare_data python "$REPO/dataset/prepare_data.py" --datasets gsm8k --out_dir dataset  # from the hub
fi
timed tiny_models python -m utils.tiny_models --out_dir tiny_models

timed collect python "$REPO/collect_training_data.py" --start_index 0 --end_index 12 --is_first_round 1 --ref_model_id tiny_models/ref \
--classifier_model_id tiny_models/classifier --classifier_type V --inference_mode bernoulli --loss_type bce --use_bias 0 --data_path dataset/gsm8k_train.jsonl \
--train_eval_save_path dataset/gsm8k_train_eval.json --use_chat_template 1 --eta 0 --temperature 0.8 --top_p 0.9 --max_new_tokens 64 \
 --dtype float32 --match_fn_type symbolic --output_dir collected_data/llama_3_8b_instruct_gsm8k/ --num_samples 4

timed combine python "$REPO/combine_training_data.py" --data_template_path collected_data/llama_3_8b_instruct_gsm8k/ --data_path dataset/gsm8k_train.jsonl --train_eval_save_path dataset/gsm8k_train_eval.json

timed train python "$REPO/train_classifier.py" --ref_model_id tiny_models/ref --classifier_model_id tiny_models/classifier \
--original_problems_path dataset/gsm8k_train.jsonl --train_eval_save_path dataset/gsm8k_train_eval.json --init_mode reuse --inference_mode bernoulli \
--loss_type bce --dataset_type gsm8k --data_paths collected_data/llama_3_8b_instruct_gsm8k/all_train_data.jsonl --drop_no_variation 0 --eta 1 --output_dir checkpoints/llama_3_8b_instruct_gsm8k/ --num_epochs 5 \
--dtype float32 --batch_size 8 --ckpt_freq 10

CKPT=$(ls -d checkpoints/llama_3_8b_instruct_gsm8k/ckpt_* | sort -V | tail -1)
timed eval python "$REPO/eval_ckpt.py" --classifier_ckpt_path "$CKPT/" --eta 10 --data_path dataset/gsm8k_test.jsonl --train_eval_save_path dataset/gsm8k_test_eval.json \
--start_index 0 --end_index 16 --max_new_tokens 64
