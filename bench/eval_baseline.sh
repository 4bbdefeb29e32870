#!/usr/bin/env bash
# The foundation issue's baselines: the embedded model on the first 200 rows of GSM8K and MATH-500,
# 4 samples each at T=0.6, top-p 0.95 (LIMIT= for the whole sets; the backend is eval's default).
# Usage: [LIMIT=200] bench/eval_baseline.sh DATA_DIR OUT_DIR [extra eval flags]
set -euo pipefail
data=$1 out=$2; shift 2
limit=${LIMIT-200}
for task in gsm8k math500; do
  file=$data/$([ $task = gsm8k ] && echo gsm8k_test.jsonl || echo math500_test.jsonl)
  python -m r1kit.cli eval --model default --task $task --data "$file" --samples 4 ${limit:+--limit $limit} \
    --temperature 0.6 --top-p 0.95 --max-new-tokens 1024 --out "$out/$task" "$@"
done
