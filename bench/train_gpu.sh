#!/usr/bin/env bash
# GRPO issue on the GPU: (1) learning on the easy addition task for 330 s of training,
# (2) seconds per step at G=8, 8 prompts, 256 completion tokens, beta=0.04.
# Usage: bench/train_gpu.sh OUT_DIR
set -euo pipefail
out=$1
python -m r1kit.cli train --config examples/train_addition.yaml out=$out/easy
python -m r1kit.cli report $out/easy
python bench/summarize_run.py $out/easy | tee $out/easy_summary.json
python -m r1kit.cli train --config examples/train_addition.yaml out=$out/speed group_size=8 prompts_per_step=8 \
  max_completion_tokens=256 beta=0.04 steps=12 time_budget_s=null eval_problems=0
python bench/summarize_run.py $out/speed --skip-first 2 | tee $out/speed_summary.json
