"""Print what BENCHMARKS.md needs from an `r1kit train` run folder: held-out before/after, steps, step times.

Usage: python bench/summarize_run.py RUN_DIR [--skip-first N]   (N warm-up steps left out of the medians)
"""

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--skip-first", type=int, default=1)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_s" in r]
    timed = steps[args.skip_first :] or steps
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval/")}
             for r in rows if "eval/greedy_accuracy" in r]
    out = {
        "steps": len(steps),
        "train_s": steps[-1]["train_s"] if steps else 0,
        "median_step_s": statistics.median(r["step_s"] for r in timed),
        "median_split_s": {k: statistics.median(r[k] for r in timed)
                           for k in ("generation_s", "scoring_s", "update_s")},
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "completion_length_mean_first_last": [steps[0]["completion_length_mean"], steps[-1]["completion_length_mean"]],
        "reward_every10": [round(r["reward"], 3) for r in steps[::10]],
        # a step whose groups all had equal rewards has nothing to update (also `skipped`); the others went non-finite
        "skipped_non_finite": [r["step"] for r in steps if r.get("skipped") and r.get("zero_variance_groups", 0)
                               < r.get("groups_generated", 1)],
        "steps_all_groups_equal": [r["step"] for r in steps if r.get("groups_generated")
                                   and r.get("zero_variance_groups") == r["groups_generated"]],
        "gpu_memory_gb": max((r.get("gpu_memory_gb", 0) for r in steps), default=0),
        "evals": evals,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
