#!/usr/bin/env bash
# `r1kit train` on the GPU machine across calls: it gets SIGTERM (so it checkpoints) after SECONDS_LEFT, and the
# same command in the next call on the same warm machine continues it with resume=latest; a finished run is left
# alone. Writes $OUT/NAME.log, NAME.json (bench/summarize_run.py: held-out, step times, skipped updates),
# NAME_metrics.jsonl and NAME_report.png. With SECONDS_LEFT under 30 it does nothing.
# Usage (after the two unpack calls): source bench/device_env.sh && bash bench/train_resumable.sh CONFIG NAME [k=v ...]
#   SECONDS_LEFT=500 bash bench/train_resumable.sh examples/train_addition.yaml addition steps=379 time_budget_s=null
set -uo pipefail
config=$1 name=$2; shift 2
run=runs/$name
left=${SECONDS_LEFT:-540}
if [ -d "$run/final" ]; then echo "$name: finished"; exit 0; fi
if (( left < 30 )); then echo "$name: ${left}s left, not started"; exit 0; fi
resume=()
if compgen -G "$run/checkpoints/*" > /dev/null; then resume=(resume=latest); fi
timeout -s TERM "$left" python -m r1kit.cli train --config "$config" out="$run" "$@" "${resume[@]}" \
  2>&1 | grep --line-buffered -v -E "^\s*$|Loading weights|Writing model shards" | tee -a "$OUT/$name.log"
python bench/summarize_run.py "$run" > "$OUT/$name.json"
cp "$run/metrics.jsonl" "$OUT/${name}_metrics.jsonl"
python -m r1kit.cli report "$run" > /dev/null && cp "$run"/report/*.png "$OUT/" 2>/dev/null
true
