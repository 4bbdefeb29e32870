"""`r1kit demo`: the embedded model on held-out arithmetic, as a first look at the eval harness."""

from __future__ import annotations

from typing import Any

from r1kit.config import DemoConfig, EvalConfig

HELD_OUT_SEED = 1234  # training data (the GRPO issue) is drawn from other seeds


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Evaluate the embedded SmolLM2-135M-Instruct on cfg.problems arithmetic problems."""
    from r1kit.eval.harness import run_eval

    eval_cfg = EvalConfig(model="default", task="arithmetic", task_args={"n": cfg.problems, "seed": HELD_OUT_SEED},
                          samples=cfg.samples, max_new_tokens=cfg.max_new_tokens, device=cfg.device, out=cfg.out)
    return run_eval(eval_cfg)
