"""TRL's GRPOTrainer on an r1kit training config's task, prompts, rewards and held-out rows, for the learning
comparison beside `r1kit train` (the correctness issue, item 16).

Two presets:
- `defaults`: TRL's documented defaults (lr 1e-6, G=8, epsilon 0.2, no epsilon_high, loss `dapo`), with only
  what the task fixes taken from the config: prompts per step, completion length, temperature, reward weights;
- `matched`: as close to the config as TRL allows: lr, warm-up, group size, clip low/high, beta, loss type,
  gradient clipping. TRL has no dynamic sampling (DAPO's filter of equal-reward groups): a config that asks for
  it is run without, and the JSON says so.

Both see the same prompts (r1kit's template, rendered once, as TRL's plain-text prompts), the same reward
functions (r1kit's rewards take TRL's signature) and the same held-out rows, scored before and after by r1kit's
own held-out evaluation (greedy, and sampled at the config's eval temperature). The time budget counts training
steps only. Writes a JSON of the settings, steps, step times, rewards and held-out figures.

  python bench/trl_grpo.py examples/train_addition.yaml --preset defaults --out trl_defaults.json
  python bench/trl_grpo.py examples/train_addition.yaml --preset matched time_budget_s=240 --out trl_matched.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from r1kit.config import TrainConfig, load_config, parse_overrides
from r1kit.eval.held_out import HeldOut, held_out_accuracy
from r1kit.models import load_model, resolve_model
from r1kit.prompts import build_prompt
from r1kit.rewards import build_rewards
from r1kit.rl.run import build_tasks
from r1kit.rollout import make_generator


def trl_settings(cfg: TrainConfig, preset: str) -> dict[str, Any]:
    """GRPOConfig keyword arguments for a preset; what the task fixes is the same in both."""
    task = {"max_completion_length": cfg.max_completion_tokens, "temperature": cfg.temperature}
    if preset == "defaults":
        return {**task, "num_generations": 8}
    return {**task, "num_generations": cfg.group_size, "learning_rate": cfg.lr, "warmup_steps": cfg.warmup_steps,
            "epsilon": cfg.clip_low, "epsilon_high": cfg.clip_high, "beta": cfg.beta, "loss_type": cfg.loss_type,
            "max_grad_norm": cfg.max_grad_norm}


def held_out(model_dir: str, cfg: TrainConfig, task, device: str) -> dict[str, float]:
    """r1kit's held-out evaluation of the model in model_dir, as `r1kit train` runs it."""
    model, tokenizer = load_model(model_dir, device=device)
    generator = make_generator(model, tokenizer, cfg.backend, cfg.batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    held = HeldOut(task, cfg.template, cfg.max_completion_tokens, cfg.eval_samples, cfg.eval_temperature, cfg.seed)
    result = held_out_accuracy(model, generator, tokenizer, held, autocast)
    del model, generator
    return result


def main() -> None:
    """Train with TRL's GRPOTrainer under a preset and write the comparison's JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="an r1kit train config (YAML)")
    parser.add_argument("overrides", nargs="*", help="key=value settings of that config")
    parser.add_argument("--preset", choices=["defaults", "matched"], default="matched")
    parser.add_argument("--out", default="trl_grpo.json")
    parser.add_argument("--work", default="/tmp/trl_grpo", help="TRL's output folder")
    args = parser.parse_intermixed_args()  # key=value settings may come before or after the options

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cfg = load_config(TrainConfig, args.config, parse_overrides(args.overrides))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = str(resolve_model(cfg.model))
    train_task, held_task = build_tasks(cfg)
    rewards = build_rewards(cfg.rewards, accuracy=train_task.reward)
    _, tokenizer = load_model(model_dir, device="cpu")
    # the task's verifier reads TRL's `row` column: the row as r1kit's trainer passes it
    rows = [{"prompt": build_prompt(row["prompt"], tokenizer, cfg.template, train_task.answer_format), "row": row}
            for row in train_task.rows]
    result: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "preset": args.preset,
                              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "dynamic_sampling": "not in TRL" if cfg.dynamic_sampling else False}
    if held_task is not None:
        result["before"] = held_out(model_dir, cfg, held_task, device)

    settings = trl_settings(cfg, args.preset)
    result["trl_settings"] = settings
    trl_cfg = GRPOConfig(output_dir=args.work, per_device_train_batch_size=cfg.prompts_per_step * settings[
        "num_generations"], max_steps=cfg.steps, logging_steps=1, report_to=[], save_strategy="no",
        bf16=device == "cuda", use_cpu=device == "cpu", seed=cfg.seed,
        reward_weights=[w for _, w in rewards.values()], **settings)
    step_s: list[float] = []

    class Budget(TrainerCallback):
        """Stops training once its steps took the config's time budget (evaluation excluded)."""

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, _args, _state, control, **__):
            step_s.append(time.perf_counter() - self.started)
            if cfg.time_budget_s and sum(step_s) >= cfg.time_budget_s:
                control.should_training_stop = True

    trainer = GRPOTrainer(model=model_dir, reward_funcs=[fn for fn, _ in rewards.values()], args=trl_cfg,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Budget()])
    trainer.train()
    final = Path(args.work) / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(final)
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    result["train"] = {"steps": len(step_s), "train_s": sum(step_s),
                       "median_step_s": sorted(step_s)[len(step_s) // 2] if step_s else None,
                       "reward": [entry["reward"] for entry in logs]}
    del trainer
    if held_task is not None:
        result["after"] = held_out(str(final), cfg, held_task, device)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result.get(k) for k in ("preset", "before", "after")}, indent=1))


if __name__ == "__main__":
    main()
