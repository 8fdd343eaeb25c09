#!/usr/bin/env bash
# Fingerprint of every file the decoding backends write, on the local tiny models: round-1
# collection, a V/bce and a Q/mle classifier trained on it, guided round-2 collection with
# each, and guided evaluation with each, all with both --engine continuous and generate.
# Run it before and after a change to decoding (each in its own checkout); the two sha256 lists
# must be equal:  diff BEFORE/sha256.txt AFTER/sha256.txt
#   bash scripts/decode_identity.sh [WORKDIR]   (default: decode_identity/; writes WORKDIR/sha256.txt)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-decode_identity}"
SHARED="$REPO/../shared/datasets"
mkdir -p "$WORK" && cd "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python "$REPO/dataset/prepare_data.py" --raw_dir "$SHARED/raw" --splits_dir "$SHARED/splits" --datasets gsm8k --out_dir dataset >/dev/null
python -m utils.tiny_models --out_dir tiny_models >/dev/null
DATA=(--data_path dataset/gsm8k_train.jsonl --train_eval_save_path dataset/gsm8k_train_eval.json)
SAMPLING=(--use_chat_template 1 --temperature 0.8 --top_p 0.9 --max_new_tokens 40 --dtype float32 --batch_size 3)
for engine in continuous generate; do
  python "$REPO/collect_training_data.py" --is_first_round 1 --end_index 6 --num_samples 2 --ref_model_id tiny_models/ref \
    --classifier_model_id tiny_models/classifier "${DATA[@]}" "${SAMPLING[@]}" --eta 0 --engine $engine \
    --output_dir collected/r1_$engine >/dev/null
done
python "$REPO/combine_training_data.py" --data_template_path collected/r1_continuous/ "${DATA[@]}" >/dev/null
for head in "V bce" "Q mle"; do
  set -- $head
  python "$REPO/train_classifier.py" --ref_model_id tiny_models/ref --classifier_model_id tiny_models/classifier \
    --original_problems_path dataset/gsm8k_train.jsonl --train_eval_save_path dataset/gsm8k_train_eval.json \
    --init_mode reuse --inference_mode bernoulli --classifier_type $1 --loss_type $2 --dataset_type gsm8k \
    --data_paths collected/r1_continuous/all_train_data.jsonl --drop_no_variation 0 --eta 5 --num_epochs 1 \
    --dtype float32 --batch_size 4 --ckpt_freq 1000 --output_dir checkpoints/$1_$2 >/dev/null
  CKPT=$(ls -d checkpoints/$1_$2/ckpt_* | sort -V | tail -1)
  for engine in continuous generate; do
    python "$REPO/collect_training_data.py" --is_first_round 0 --classifier_ckpt_path "$CKPT" --end_index 6 --num_samples 2 \
      "${SAMPLING[@]}" --eta 5 --engine $engine --output_dir collected/r2_$1_$2_$engine >/dev/null
    python "$REPO/eval_ckpt.py" --classifier_ckpt_path "$CKPT" --eta 0 5 --end_index 16 --num_samples 2 \
      "${SAMPLING[@]}" --engine $engine --output_dir eval/$1_$2_$engine >/dev/null
  done
done
# the run-settings files record absolute paths: hashed with this folder's path as WORKDIR
find collected eval -type f | LC_ALL=C sort | while read -r f; do
  printf '%s  %s\n' "$(sed "s|$PWD|WORKDIR|g" "$f" | sha256sum | cut -d' ' -f1)" "$f"
done > sha256.txt
echo "$(wc -l < sha256.txt) files -> $WORK/sha256.txt"
