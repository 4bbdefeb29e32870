#!/usr/bin/env bash
# The full GSM8K eval (1,319 x 4, T=0.6, top-p 0.95, up to 1,024 tokens, the engine's defaults) three times on one
# machine, each in a process of its own: the engine's decode layers not compiled, compiled, compiled again. On a
# fresh machine the first shows an eval that compiles only the sampler, the second one that compiles the layers
# from nothing, the third one that finds them in torch's compile cache. Each run's process wall time (imports
# included) goes to OUT/eval_<run>.wall, its results.json to OUT/eval_<run>.results.json.
# Usage: bench/eval_compile.sh DATA_DIR OUT_DIR
set -euo pipefail
data=$1 out=$2
mkdir -p "$out"
for run in 1_no-compile 2_compile 3_compile; do
  start=$(date +%s.%N)
  python -m r1kit.cli eval --model default --task gsm8k --data "$data/gsm8k_test.jsonl" --samples 4 \
    --temperature 0.6 --top-p 0.95 --max-new-tokens 1024 "--${run#*_}" --out "/tmp/runs/eval_$run" \
    > "$out/eval_$run.log" 2>&1
  python -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$start" > "$out/eval_$run.wall"
  cp "/tmp/runs/eval_$run/results.json" "$out/eval_$run.results.json"
  echo "$run: process wall $(cat "$out/eval_$run.wall") s"
done
