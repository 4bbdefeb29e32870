"""TRL's GRPOTrainer seconds per step on the GRPO issue's speed configuration, for the same-call comparison
with `r1kit train`: the embedded model, the easy addition task (last integer = the sum), G=8, 8 prompts
per step, 256 max completion tokens, beta=0.04, bf16, T=1.

Usage (needs trl and datasets, as staged for the GPU machine):
    python bench/trl_step_time.py --steps 12 --out $OUT/trl_step_time.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bench_io import emit
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from r1kit.models import resolve_model
from r1kit.tasks import load_task


class StepTimes(TrainerCallback):
    """Wall seconds of each optimizer step (generation, scoring and update together)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip-first", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    task = load_task("addition", n=2000, low=1, high=50, strict=False)
    rows = task.rows
    order = random.Random(0).sample(range(len(rows)), len(rows))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": rows[i]["prompt"]}], "idx": i} for i in order])

    def correct(completions, idx, **kwargs):
        """The task's own verifier, as r1kit train scores it."""
        return [task.verify(c[0]["content"], rows[i]) for c, i in zip(completions, idx, strict=True)]

    cfg = GRPOConfig(output_dir="/tmp/trl_step_time", per_device_train_batch_size=64, num_generations=8,
                     max_completion_length=256, max_steps=args.steps, learning_rate=3e-5, beta=0.04,
                     temperature=1.0, bf16=True, model_init_kwargs={"dtype": "bfloat16"}, logging_steps=1,
                     report_to=[], save_strategy="no")
    timer = StepTimes()
    trainer = GRPOTrainer(model=str(resolve_model("default")), reward_funcs=[correct], args=cfg, train_dataset=data,
                          callbacks=[timer])
    trainer.train()
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log]
    result = {"steps": len(timer.times), "median_step_s": statistics.median(timer.times[args.skip_first:]),
              "step_s": [round(t, 2) for t in timer.times], "completion_length_mean": lengths}
    emit(result, args.out)


if __name__ == "__main__":
    main()
