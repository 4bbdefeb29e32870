"""`r1kit train`: build the run (model, tasks, rewards, trainer), loop over steps, evaluate, checkpoint."""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from r1kit import distributed
from r1kit.config import TrainConfig
from r1kit.eval.held_out import HeldOut, generated_rows, held_out_accuracy
from r1kit.models import checkpoint_dtype, load_model, resolve_model, weights_sha256
from r1kit.rewards import RewardFn, build_rewards
from r1kit.rl.checkpoint import StopRequest, find_checkpoint, resume_run, save_final, save_run
from r1kit.rl.runlog import RunLog, open_run_folder
from r1kit.rl.trainer import GRPOTrainer, Rollouts
from r1kit.rollout import make_generator
from r1kit.tasks import Task, load_task, task_options


def build_tasks(cfg: TrainConfig) -> tuple[Task, Task | None]:
    """Training rows and held-out rows; no held-out prompt is ever trained on."""
    train = load_task(cfg.task, cfg.data, **cfg.task_args)
    if cfg.eval_problems == 0:
        return train, None
    options = task_options(cfg.task)
    if "data" in options and cfg.eval_data is None:
        held = train.with_rows(train.rows[-cfg.eval_problems :])
    else:
        held = generated_rows(cfg.task, cfg.eval_data, cfg.task_args, cfg.eval_task_args, cfg.eval_problems)
    held_prompts = {row["prompt"] for row in held.rows}
    train.rows = [row for row in train.rows if row["prompt"] not in held_prompts]
    if not train.rows:
        raise ValueError("every training row is also a held-out row; change eval_task_args or eval_data")
    return train, held


def policy_placement(device: str, sharded: bool) -> tuple[str, str]:
    """(device, dtype) a model to train loads in: fp32 master weights on `device`, or for FSDP over several ranks
    (`sharded`) the checkpoint's own dtype on the CPU, memory-mapped. FSDP moves each layer's shard to the GPU as it
    shards it, where the whole fp32 model might not fit, and makes it fp32 then (distributed.fully_sharded), so no
    rank holds a whole fp32 copy on its host either."""
    return ("cpu", "stored") if sharded else (device, "float32")


def load_policy(spec: str, device: str, lora_r: int, lora_alpha: int, gradient_checkpointing: bool,
                checkpoint: Path | None = None, sharded: bool = False):
    """(model, tokenizer) to train, placed by policy_placement: LoRA adapters on every linear layer when lora_r > 0,
    from `checkpoint` when resuming (its full weights, or its adapters on the base model)."""
    full_resume = checkpoint is not None and lora_r == 0
    model, tokenizer = load_model(str(checkpoint) if full_resume else spec, *policy_placement(device, sharded))
    if lora_r:
        from peft import LoraConfig, PeftModel, get_peft_model

        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_r:
            model.enable_input_require_grads()
    model.train()
    return model, tokenizer


def build_policy(cfg: TrainConfig, checkpoint: Path | None, sharded: bool = False):
    """(policy, tokenizer, reference or None), placed by policy_placement; the reference is a frozen copy of the
    starting model."""
    model, tokenizer = load_policy(cfg.model, cfg.device, cfg.lora_r, cfg.lora_alpha, cfg.gradient_checkpointing,
                                   checkpoint, sharded)
    ref = None
    if cfg.beta > 0 and cfg.lora_r == 0:
        ref = (load_model(cfg.model, *policy_placement(cfg.device, sharded))[0] if checkpoint is not None
               else copy.deepcopy(model))
        ref.requires_grad_(False).eval()
    return model, tokenizer, ref


def build_trainer(cfg: TrainConfig, world: distributed.World, device: str, checkpoint: Path | None, task: Task,
                  rewards: dict[str, tuple[RewardFn, float]]) -> tuple[GRPOTrainer, Any]:
    """(trainer, tokenizer) on `device`. Under parallel=fsdp over several ranks the policy is loaded on the CPU and
    sharded by the trainer, and the generator reads an unsharded copy of its own, in the engine's dtype on a GPU so
    that the engine shares the copy's storage rather than keeping a second one."""
    sharded = cfg.parallel == "fsdp" and world.size > 1
    model, tokenizer, ref = build_policy(cfg.model_copy(update={"device": device}), checkpoint, sharded)
    rollout = None
    if sharded:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        rollout = distributed.unsharded_copy(model, device, dtype)
    generator = make_generator(model if rollout is None else rollout, tokenizer, cfg.backend, cfg.batch_size,
                               cfg.max_prompt_tokens + cfg.max_completion_tokens)
    return GRPOTrainer(cfg, model, tokenizer, task, rewards, generator, ref, rollout, device), tokenizer


FEW_STEPS = 10  # fewer GRPO steps than this rarely move held-out accuracy


def budget_steps(cfg: TrainConfig, step: int, train_s: float, step_s: float) -> int:
    """The steps a run under time_budget_s will have taken at step_s seconds a step: those done, and one per
    step_s left in the budget, rounded up (the loop stops after the first step that ends past it)."""
    left = max(0.0, cfg.time_budget_s - train_s)
    return min(cfg.steps, step + math.ceil(left / max(step_s, 1e-9)))


def plan_line(cfg: TrainConfig, step: int, step_s: float, planned: int) -> str:
    """The steps time_budget_s fits at the speed measured so far, with what to change if too few."""
    line = f"step {step} took {step_s:.1f} s: time_budget_s={cfg.time_budget_s:g} fits about {planned} steps"
    return line + (f"; [yellow]{too_few(cfg, step_s)}" if planned < FEW_STEPS else "")


def too_few(cfg: TrainConfig, step_s: float) -> str:
    """What to change when time_budget_s allows fewer than FEW_STEPS steps of step_s seconds."""
    return (f"too few to learn much; give it time_budget_s={math.ceil(FEW_STEPS * step_s)} or more, or run it where "
            "the CPU is free or on a GPU")


def held_out_eval(trainer: GRPOTrainer, task: Task, cfg: TrainConfig, progress: Progress | None = None
                  ) -> dict[str, float]:
    """Greedy and sampled (eval_temperature) accuracy on the held-out rows (with bars on `progress`)."""
    trainer.sync_generator()  # the last update came after the last rollout
    held = HeldOut(task, cfg.template, cfg.max_completion_tokens, cfg.eval_samples, cfg.eval_temperature, cfg.seed)
    return held_out_accuracy(trainer.model, trainer.generator, trainer.tokenizer, held, trainer.autocast(), progress,
                             trainer.world)


def evaluation_bars(console: Console) -> Progress:
    """Bars for a held-out evaluation outside the training loop's display (on a slow CPU it takes minutes)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def step_samples(batch: Rollouts, group_size: int, groups: int = 1) -> list[dict[str, Any]]:
    """The completions of the first groups of a step, with their rewards, for the report."""
    out = []
    for j, row in enumerate(batch.rows[:groups]):
        for k in range(group_size):
            i = j * group_size + k
            out.append({"prompt": row["prompt"], "answer": row["answer"], "completion": batch.completions[i].text,
                        "reward": batch.rewards[i].item(), "finish_reason": batch.completions[i].finish_reason})
    return out


def progress_line(m: dict[str, Any]) -> str:
    """A short live summary of a step's metrics."""
    acc = m.get("rewards/accuracy")
    parts = [f"reward {m['reward']:.3f}", f"acc {acc:.3f}" if acc is not None else "",
             f"len {m['completion_length_mean']:.0f}", f"{m['step_s']:.1f} s/step"]
    if "eval/greedy_accuracy" in m:
        parts.append("held-out " + eval_line(m))
    return " · ".join(p for p in parts if p)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """run.json: the starting model's identity, held-out accuracy before and after, steps, training time (written
    by rank 0 alone)."""
    if distributed.world().is_main:
        (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")


def eval_line(m: dict[str, float]) -> str:
    """Held-out accuracy, greedy and sampled, in one line."""
    return f"greedy {m['eval/greedy_accuracy']:.3f} · sampled {m['eval/sampled_accuracy']:.3f}"


def run_train(cfg: TrainConfig, console: Console | None = None) -> dict[str, Any]:
    """The train command; returns the run summary (with `interrupted` when Ctrl-C stopped it). Under torchrun every
    rank runs it on its share of each step: rank 0 alone writes the run folder and prints."""
    with distributed.rank_session(cfg.device, console) as (world, device, console):
        return train(cfg, world, device, console)


def train(cfg: TrainConfig, world: distributed.World, device: str, console: Console) -> dict[str, Any]:
    """run_train as one rank of `world`, training on `device`."""
    out = Path(cfg.out)
    folder = resolve_model(cfg.model)  # a bad model, data path or reward fails before the run folder exists
    checkpoint = find_checkpoint(cfg.resume, out)
    torch.manual_seed(cfg.seed)
    train_task, held = build_tasks(cfg)
    rewards = build_rewards(cfg.rewards, accuracy=train_task.reward)
    if world.is_main:
        open_run_folder(out, cfg.model_dump(), checkpoint is None, console)
    trainer, tokenizer = build_trainer(cfg, world, device, checkpoint, train_task, rewards)
    summary: dict[str, Any] = {"model": cfg.model, "model_path": str(folder), "model_sha256": weights_sha256(folder),
                               "interrupted": False}
    if checkpoint is not None:
        resume_run(checkpoint, trainer, summary)
        console.print(f"resumed from {checkpoint} at step {trainer.step_count}")
    log = RunLog(out, trainer.step_count)
    if held is not None and trainer.step_count == 0:
        with evaluation_bars(console) as bars:
            summary["before"] = held_out_eval(trainer, held, cfg, bars)
        log.metrics(0, summary["before"])
        console.print("held-out before training: " + eval_line(summary["before"]))

    stop = StopRequest()
    started, metrics, interrupted = time.perf_counter(), {}, False
    step0, train_s0 = trainer.step_count, summary.get("train_s", 0.0)  # where this session starts
    columns = (TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    try:
        with Progress(*columns, console=console) as progress, warnings.catch_warnings():
            if world.is_main:  # the others stay quiet (rank_session)
                warnings.simplefilter("always", RuntimeWarning)
            # under a time budget the steps are unknown until the first one is measured
            total = cfg.steps if cfg.time_budget_s is None else None
            bar = progress.add_task("", total=total, completed=trainer.step_count)
            while trainer.step_count < cfg.steps:
                metrics, batch = trainer.step()
                step = trainer.step_count
                if held is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    metrics.update(held_out_eval(trainer, held, cfg))
                metrics["train_s"] = train_s0 + time.perf_counter() - started
                log.metrics(step, metrics)
                log.samples(step, step_samples(batch, cfg.group_size))
                progress.update(bar, completed=step, description=progress_line(metrics))
                out_of_time = cfg.time_budget_s is not None and metrics["train_s"] >= cfg.time_budget_s
                # every rank stops after the same step: a signal may reach one rank, clocks differ
                interrupted, out_of_time = world.any(stop.requested, out_of_time)
                if interrupted or out_of_time:
                    break
                if cfg.time_budget_s is not None:  # plan by the speed measured so far, not an assumed one
                    step_s = (metrics["train_s"] - train_s0) / (step - step0)
                    planned = budget_steps(cfg, step, metrics["train_s"], step_s)
                    progress.update(bar, total=planned)
                    if step == step0 + 1 and planned < cfg.steps:  # the budget, not `steps`, ends this run
                        console.print(plan_line(cfg, step, step_s, planned))
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:  # the last one follows
                    save_run(out, trainer, tokenizer, summary, cfg.keep_checkpoints)
    finally:
        stop.restore()
    summary["train_s"] = metrics.get("train_s", summary.get("train_s", 0.0))
    summary["steps"] = trainer.step_count
    budget_cut = cfg.time_budget_s is not None and summary["train_s"] >= cfg.time_budget_s
    if budget_cut and trainer.step_count < FEW_STEPS:  # a busy or slow machine: say so rather than a flat result
        n = trainer.step_count
        step_s = summary["train_s"] / max(1, n)
        console.print(f"[yellow]time_budget_s={cfg.time_budget_s:g} allowed {n} step{'s' * (n != 1)} "
                      f"({step_s:.0f} s a step): {too_few(cfg, step_s)}")
    if interrupted:
        summary["interrupted"] = True
        write_summary(out, summary)
        path = save_run(out, trainer, tokenizer, summary, cfg.keep_checkpoints)
        console.print(f"[yellow]interrupted: saved {path}; continue with resume=latest")
        log.close()
        return summary
    if held is not None:
        with evaluation_bars(console) as bars:
            summary["after"] = held_out_eval(trainer, held, cfg, bars)
        log.metrics(trainer.step_count, summary["after"])
        console.print("held-out after training: " + eval_line(summary["after"]))
    path, final = save_final(out, trainer, tokenizer, summary, cfg.keep_checkpoints, checkpoint_dtype(folder))
    log.close()
    if final is None:  # not rank 0
        return summary
    summary["final"], summary["final_sha256"] = str(final), weights_sha256(final)
    write_summary(out, summary)
    console.print(f"saved {path} and {final} (the trained model{', LoRA merged' if cfg.lora_r else ''})")
    return summary
