#!/usr/bin/env bash
# The R1 pipeline on GSM8K (examples/r1_gsm8k.yaml) on the GPU machine, within one call's time limit: the
# pipeline gets SIGTERM after SECONDS_LEFT (default 540) and a rerun of this script, in the next call on the same
# warm machine, skips the finished stages and resumes the interrupted one. Stage records, metrics, evaluations
# and the report go to $OUT/pipeline.tgz.
# Usage (after the two unpack calls): source bench/device_env.sh && bash bench/pipeline_gsm8k.sh [key=value ...]
set -uo pipefail
run=runs/r1_gsm8k
timeout -s TERM "${SECONDS_LEFT:-540}" python -m r1kit.cli pipeline --config examples/r1_gsm8k.yaml \
  data="$R1_DEVICE_DATA/gsm8k_train.jsonl" eval.data="$R1_DEVICE_DATA/gsm8k_test.jsonl" out=$run "$@" \
  2>&1 | grep --line-buffered -v -E "^\s*$|Loading weights|Writing model shards" | tee -a "$OUT/pipeline.log"
find $run -maxdepth 3 \( -name stage.json -o -name metrics.jsonl -o -name results.json -o -name summary.md \
  -o -name run.json -o -name config.yaml -o -path "*/report/*" -o -name "*.progress.json" \) -print0 \
  | tar -czf "$OUT/pipeline.tgz" --null -T -
ls -la "$OUT"
