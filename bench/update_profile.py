"""Where a GRPO step's update goes: `r1kit train`'s trainer built as the train command builds it, a few steps
to warm up, then torch.profiler over the next steps' updates (operators and kernels by GPU time and by CPU time).

GPU:   python bench/update_profile.py --config examples/train_addition.yaml group_size=8 prompts_per_step=8 \
         max_completion_tokens=256 beta=0.04 dynamic_sampling=false --out $OUT/update_profile.json
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_io import save_json
from torch.profiler import ProfilerActivity, profile

from r1kit.config import TrainConfig, load_config, parse_overrides
from r1kit.rewards import build_rewards
from r1kit.rl.run import build_policy, build_tasks
from r1kit.rl.trainer import GRPOTrainer
from r1kit.rollout import make_generator


def table(events, key: str, n: int = 25) -> list[dict]:
    """The n largest operators by total `key` time, in ms."""
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key, "calls": e.count, "ms": round(getattr(e, key) / 1000, 2)} for e in rows]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="examples/train_addition.yaml")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(TrainConfig, args.config, parse_overrides(args.overrides))
    torch.manual_seed(cfg.seed)
    task, _ = build_tasks(cfg)
    model, tokenizer, ref = build_policy(cfg, None)
    generator = make_generator(model, tokenizer, cfg.backend, cfg.batch_size)
    trainer = GRPOTrainer(cfg, model, tokenizer, task, build_rewards(cfg.rewards, accuracy=task.reward), generator, ref)
    for _ in range(args.warmup):
        trainer.step()
    # rolled out before profiling so that the profile holds updates only; the later updates train on rollouts
    # of a policy one or two updates old, which changes no timing
    batches, walls = [trainer.collect() for _ in range(args.steps)], []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            sync()
            t0 = time.perf_counter()
            trainer.update(batch)
            sync()
            walls.append(round(time.perf_counter() - t0, 3))
    events = prof.key_averages()
    result = {"update_s": walls, "tokens": [sum(len(c.token_ids) for c in b.completions) for b in batches],
              "longest": [max(len(c.token_ids) for c in b.completions) for b in batches],
              "by_gpu_time": table(events, "device_time_total"), "by_cpu_time": table(events, "self_cpu_time_total"),
              "gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0}
    for name in ("update_s", "tokens", "longest", "gpu_memory_gb"):
        print(name, result[name])
    for name in ("by_gpu_time", "by_cpu_time"):
        print(name)
        for row in result[name]:
            print(f"  {row['ms']:9.2f} ms {row['calls']:6d}  {row['name'][:90]}")
    save_json(result, args.out)


if __name__ == "__main__":
    main()
