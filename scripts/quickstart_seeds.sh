#!/usr/bin/env bash
# The quickstart for several seeds, one after another: each run goes to OUT/seed_S/ (its log to
# OUT/seed_S.log), then one table per seed, with its wall time and step times, is printed and
# written to OUT/tables.md.
#   bash scripts/quickstart_seeds.sh            # seeds 0 1 2 3 4 into quickstart_seeds/
# QS_SEEDS="0 1" picks the seeds, QS_SEEDS_OUT the folder; the other QS_* variables reach each run.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${QS_SEEDS_OUT:-quickstart_seeds}"
mkdir -p "$OUT"
summaries=()
for seed in ${QS_SEEDS:-0 1 2 3 4}; do
  echo "== seed $seed -> $OUT/seed_$seed ($(date +%H:%M:%S))"
  QS_SEED="$seed" QS_OUT="$OUT/seed_$seed" bash "$REPO/scripts/quickstart.sh" > "$OUT/seed_$seed.log" 2>&1 \
    || { echo "error: seed $seed failed; see $OUT/seed_$seed.log" >&2; exit 1; }
  summaries+=("$OUT/seed_$seed/summary.json")
done
python "$REPO/scripts/summarize_quickstart.py" --seeds "${summaries[@]}" | tee "$OUT/tables.md"
