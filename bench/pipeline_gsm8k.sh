#!/usr/bin/env bash
# A GSM8K pipeline (default examples/r1_gsm8k.yaml; CONFIG=examples/r1_cold_start_ablation.yaml for the cold-start
# ablation) on the GPU machine with the staged data: bench/pipeline_gpu.sh with data= and eval.data= set.
# Usage (after the two unpack calls): source bench/device_env.sh && bash bench/pipeline_gsm8k.sh [key=value ...]
exec bash bench/pipeline_gpu.sh "${CONFIG:-examples/r1_gsm8k.yaml}" data="$R1_DEVICE_DATA/gsm8k_train.jsonl" \
  eval.data="$R1_DEVICE_DATA/gsm8k_test.jsonl" "$@"
