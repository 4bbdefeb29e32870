"""`r1kit sft`: load traces and model, train with checkpoints and exact resume, write the final model."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r1kit.config import SFTConfig
from r1kit.eval.report import write_training_report
from r1kit.models import file_sha256, load_tokenizer, resolve_model, save_model, weights_sha256
from r1kit.rl.checkpoint import StopRequest, find_checkpoint, resume_run, save_run
from r1kit.rl.run import load_policy
from r1kit.rl.runlog import RunLog
from r1kit.sft.data import Example, load_examples
from r1kit.sft.trainer import SFTTrainer
from r1kit.tasks import DataError

FINAL = "final"  # the run folder's trained model (LoRA merged), the input of whatever comes next


def data_files(data: str | list[str]) -> list[str]:
    """The trace files of a `data` setting: one path or a list of them."""
    return [data] if isinstance(data, str) else list(data)


def load_all(files: list[str], tokenizer, cfg: SFTConfig) -> tuple[list[Example], int]:
    """The examples of several trace files, in order, and how many rows were too long."""
    examples, too_long = [], 0
    for path in files:
        loaded, long_ = load_examples(path, tokenizer, cfg.template, cfg.max_seq_len)
        examples += loaded
        too_long += long_
    return examples, too_long


def split_examples(cfg: SFTConfig, tokenizer) -> tuple[list[Example], list[Example], int]:
    """(training examples, held-out examples, rows left out as too long). Without eval_data, eval_rows examples
    spread evenly over the data (every file of a mix has its share) are held out."""
    examples, too_long = load_all(data_files(cfg.data), tokenizer, cfg)
    if cfg.eval_data:
        held, held_long = load_examples(cfg.eval_data, tokenizer, cfg.template, cfg.max_seq_len)
        return examples, held, too_long + held_long
    if cfg.eval_rows == 0:
        return examples, [], too_long
    if cfg.eval_rows >= len(examples):
        raise DataError(f"{', '.join(data_files(cfg.data))}: {len(examples)} usable rows, not more than "
                        f"eval_rows={cfg.eval_rows}; lower eval_rows or give eval_data")
    held_at = {i * len(examples) // cfg.eval_rows for i in range(cfg.eval_rows)}
    return ([ex for i, ex in enumerate(examples) if i not in held_at],
            [ex for i, ex in enumerate(examples) if i in held_at], too_long)


def sft_line(m: dict[str, Any]) -> str:
    """A short live summary of a step's metrics."""
    parts = [f"loss {m['loss']:.3f}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if "eval/loss" in m:
        parts.append(f"eval loss {m['eval/loss']:.3f}")
    return " · ".join(parts)


def run_sft(cfg: SFTConfig, console: Console | None = None) -> dict[str, Any]:
    """The sft command; returns the run summary (with `interrupted` when Ctrl-C stopped it)."""
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    folder = resolve_model(cfg.model)  # a bad model or data path fails before the run folder exists
    checkpoint = find_checkpoint(cfg.resume, out)
    tokenizer = load_tokenizer(str(folder))
    train, held, too_long = split_examples(cfg, tokenizer)
    if too_long:
        warnings.warn(f"{too_long} rows are longer than max_seq_len={cfg.max_seq_len} tokens and are left out",
                      RuntimeWarning, stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    model, tokenizer = load_policy(cfg.model, cfg.device, cfg.lora_r, cfg.lora_alpha, cfg.gradient_checkpointing,
                                   checkpoint)
    trainer = SFTTrainer(cfg, model, tokenizer, train)
    summary: dict[str, Any] = {"model": cfg.model, "model_sha256": weights_sha256(folder), "data": cfg.data,
                               "data_sha256": [file_sha256(f) for f in data_files(cfg.data)], "examples": len(train),
                               "held_out": len(held), "too_long": too_long, "steps_planned": trainer.steps,
                               "interrupted": False}
    if checkpoint is not None:
        resume_run(checkpoint, trainer, summary)
        console.print(f"resumed from {checkpoint} at step {trainer.step_count}")
    log = RunLog(out, trainer.step_count)
    if held and trainer.step_count == 0:
        summary["eval_loss_before"] = trainer.eval_loss(held)
        log.metrics(0, {"eval/loss": summary["eval_loss_before"]})
        console.print(f"eval loss before training: {summary['eval_loss_before']:.4f} ({len(held)} held-out rows)")

    stop = StopRequest()
    started, train_s = time.perf_counter(), summary.get("train_s", 0.0)
    columns = (TextColumn("[bold]SFT"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.description}"))
    try:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("", total=trainer.steps, completed=trainer.step_count)
            while trainer.step_count < trainer.steps:
                metrics = trainer.step()
                step = trainer.step_count
                if held and cfg.eval_every and step % cfg.eval_every == 0 and step < trainer.steps:
                    metrics["eval/loss"] = trainer.eval_loss(held)
                train_s = summary.get("train_s", 0.0) + time.perf_counter() - started
                metrics["train_s"] = train_s
                log.metrics(step, metrics)
                progress.update(bar, completed=step, description=sft_line(metrics))
                out_of_time = cfg.time_budget_s is not None and train_s >= cfg.time_budget_s
                if stop.requested or out_of_time:
                    break
                if cfg.save_every and step % cfg.save_every == 0:
                    save_run(out, trainer, tokenizer, summary, cfg.keep_checkpoints)
    finally:
        stop.restore()
    summary["train_s"], summary["steps"] = train_s, trainer.step_count
    if stop.requested:
        summary["interrupted"] = True
        path = save_run(out, trainer, tokenizer, summary, cfg.keep_checkpoints)
        log.close()
        console.print(f"[yellow]interrupted: saved {path}; continue with resume=latest")
        return summary
    if held:
        summary["eval_loss_after"] = trainer.eval_loss(held)
        log.metrics(trainer.step_count, {"eval/loss": summary["eval_loss_after"]})
        console.print(f"eval loss after training: {summary['eval_loss_after']:.4f}")
    save_run(out, trainer, tokenizer, summary, cfg.keep_checkpoints)
    log.close()
    final = save_model(trainer.model, tokenizer, out / FINAL)
    summary["final"], summary["final_sha256"] = str(final), weights_sha256(final)
    (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_training_report(out)
    console.print(f"saved {final} (sha256 {summary['final_sha256'][:12]})")
    return summary
