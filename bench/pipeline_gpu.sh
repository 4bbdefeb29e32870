#!/usr/bin/env bash
# A pipeline (examples/r1_*.yaml) on the GPU machine within one call's time limit: the pipeline gets SIGTERM after
# SECONDS_LEFT (default 540) and a rerun of this script, in the next call on the same warm machine, skips the
# finished stages and resumes the interrupted one. Stage records, metrics, evaluations and the report go to
# $OUT/NAME.tgz (NAME: the config's file name without .yaml), the log to $OUT/NAME.log, the curves to
# $OUT/NAME_curves.png. With SECONDS_LEFT under 30 it does nothing, so calls can chain pipelines on one deadline.
# RUNS (default runs) is where the run folder goes: a folder outside the checkout (RUNS=/tmp/runs) survives a
# call that replaces the checkout's copy, as a carried snapshot of the code does (the run then starts over).
# Usage (after the two unpack calls): source bench/device_env.sh && bash bench/pipeline_gpu.sh CONFIG [key=value ...]
#   bash bench/pipeline_gpu.sh examples/r1_distill_vs_rl.yaml
#   bash bench/pipeline_gsm8k.sh            # the GSM8K pipelines, with the staged data
set -uo pipefail
config=$1; shift
name=$(basename "$config" .yaml)
run=${RUNS:-runs}/$name
left=${SECONDS_LEFT:-540}
if (( left < 30 )); then echo "$name: ${left}s left, not started"; exit 0; fi
timeout -s TERM "$left" python -m r1kit.cli pipeline --config "$config" out="$run" "$@" \
  2>&1 | grep --line-buffered -v -E "^\s*$|Loading weights|Writing model shards" | tee -a "$OUT/$name.log"
find "$run" -maxdepth 3 \( -name stage.json -o -name metrics.jsonl -o -name results.json -o -name summary.md \
  -o -name run.json -o -name config.yaml -o -path "*/report/*" -o -name "*.progress.json" \) -print0 \
  | tar -czf "$OUT/$name.tgz" --null -T -
cp "$run/report/curves.png" "$OUT/${name}_curves.png" 2>/dev/null
ls -la "$OUT"
