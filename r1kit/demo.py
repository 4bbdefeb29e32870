"""`r1kit demo`, the main job: held-out eval, GRPO on addition, held-out eval again, report."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from r1kit.config import DemoConfig, TrainConfig
from r1kit.models import pick_device

# The full run on a GPU (about 10 minutes with evaluations), a short one on a CPU (5 minutes on an idle
# 2-core one). Both train on `addition` (a, b in 1..50) for time_budget_s, as many steps as fit at the
# speed run_train measures in the first, and score 256 / 32 held-out problems.
SIZES: dict[str, dict[str, Any]] = {
    "cuda": {"group_size": 16, "prompts_per_step": 16, "max_completion_tokens": 128, "lr": 3e-5,
             "dynamic_sampling": True, "eval_problems": 256, "eval_every": 20, "time_budget_s": 420},
    "cpu": {"group_size": 8, "prompts_per_step": 4, "max_completion_tokens": 40, "lr": 5e-5,
            "dynamic_sampling": False, "eval_problems": 32, "eval_every": 0, "time_budget_s": 240,
            "micro_batch_size": 8, "batch_size": 32},
}


def demo_config(cfg: DemoConfig) -> TrainConfig:
    """The training config the demo runs on this machine."""
    size = dict(SIZES["cuda" if pick_device(cfg.device).type == "cuda" else "cpu"])
    if cfg.time_budget_s is not None:
        size["time_budget_s"] = cfg.time_budget_s
    # steps is only a ceiling: time_budget_s ends the run
    return TrainConfig(model="default", task="addition", task_args={"n": 20_000, "low": 1, "high": 50},
                       template="chat_plain", warmup_steps=3, clip_high=0.28, steps=10_000, save_every=0,
                       device=cfg.device, out=cfg.out, **size)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train the embedded SmolLM2-135M-Instruct with GRPO and print held-out accuracy before and after."""
    from r1kit.eval.report import write_training_report
    from r1kit.rl.run import run_train

    console = Console()
    train_cfg = demo_config(cfg)
    console.print(f"[bold]r1kit demo[/bold]: GRPO on 'What is a + b?' (a, b in 1..50) for "
                  f"{train_cfg.time_budget_s:g} s of training (as many steps as fit at the speed of the first), "
                  f"G={train_cfg.group_size}, {train_cfg.prompts_per_step} prompts/step; "
                  f"{train_cfg.eval_problems} held-out problems never trained on")
    summary = run_train(train_cfg)
    report = write_training_report(cfg.out)
    table = Table(title=f"held-out accuracy after {summary['steps']} steps ({summary['train_s']:.0f} s)")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for name in ("greedy", "sampled"):
        key = f"eval/{name}_accuracy"
        after = f"{summary['after'][key]:.1%}" if "after" in summary else "-"
        table.add_row(f"{name}{' (T=1)' if name == 'sampled' else ''}", f"{summary['before'][key]:.1%}", after)
    console.print(table)
    console.print(f"report: {report}/index.md · curves: {report}/curves.png · metrics: {cfg.out}/metrics.jsonl")
    return summary
