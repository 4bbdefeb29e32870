"""`r1kit pipeline`: run the stages in order (skipping finished ones), evaluate each model, write the report."""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from r1kit.config import EvalConfig, PipelineConfig, load_config
from r1kit.models import input_sha256
from r1kit.pipeline.report import write_pipeline_report
from r1kit.pipeline.stages import (
    Stage,
    fingerprint,
    prepare,
    read_record,
    resolve_stages,
    write_record,
)
from r1kit.rl.checkpoint import list_checkpoints

EVAL_KEYS = ("pass@1", "format_rate", "language_consistency", "truncation_rate", "response_tokens", "problems",
             "samples_per_problem")


def free_memory() -> None:
    """Hand a finished stage's GPU memory back before the next stage loads its model."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_command(stage: Stage, resume: bool) -> dict[str, Any]:
    """Run a stage's command; an interrupted SFT or GRPO stage continues from its last checkpoint."""
    config = stage.config
    if resume and stage.kind != "sample" and list_checkpoints(stage.folder / "checkpoints"):
        config = config.model_copy(update={"resume": "latest"})
    if stage.kind == "sample":
        from r1kit.sample.run import run_sample

        return run_sample(config)
    if stage.kind == "sft":
        from r1kit.sft.run import run_sft

        return run_sft(config)
    from r1kit.eval.report import write_training_report
    from r1kit.rl.run import run_train

    summary = run_train(config)
    if not summary.get("interrupted"):
        write_training_report(stage.folder)
    return summary


def evaluate_into(record: dict[str, Any], model: Path | str, folder: Path, cfg: PipelineConfig) -> None:
    """Evaluate the model with the pipeline's eval settings into its record (written to folder), unless the
    record already holds an evaluation of the same weights with the same settings."""
    from r1kit.eval.harness import run_eval

    eval_cfg = load_config(EvalConfig, None, {"task": cfg.task, "device": cfg.device, **cfg.eval,
                                              "model": str(model), "out": str(folder / "eval")})
    settings = {**eval_cfg.work(), "model": None, "data": eval_cfg.data and input_sha256(eval_cfg.data)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    sha = input_sha256(str(model))
    old = record.get("eval")
    if old and old.get("model_sha256") == sha and old.get("settings_sha256") == key:
        return
    started = time.perf_counter()
    results = run_eval(eval_cfg)
    free_memory()
    record["eval"] = {"model_sha256": sha, "settings_sha256": key, "wall_s": time.perf_counter() - started,
                      **{k: results["metrics"][k] for k in EVAL_KEYS}}
    write_record(folder, record)


def run_pipeline(cfg: PipelineConfig, console: Console | None = None) -> dict[str, Any]:
    """The pipeline command: each stage run or skipped, each model evaluated, one report; the stage records."""
    console = console or Console(stderr=True)
    stages = resolve_stages(cfg)  # every stage's config checked before anything runs
    out = Path(cfg.out)
    records: dict[str, dict[str, Any]] = {}
    if cfg.eval is not None:
        base = out / "base"
        record = read_record(base) or {"kind": "base", "model": cfg.model, "status": "done"}
        evaluate_into(record, cfg.model, base, cfg)
        records["base"] = record
        console.print(f"[bold]base[/bold]: {eval_line(record['eval'])}")
    for stage in stages:
        fp = fingerprint(stage)
        action = prepare(stage, fp)
        record = (read_record(stage.folder) if action in ("skip", "resume") else None) or {
            "kind": stage.kind, **fp, "status": "running", "config": stage.config.model_dump()}
        console.print(f"[bold]{stage.name}[/bold] ({stage.kind}): " + {
            "skip": "finished with this config and inputs; skipped", "resume": "resuming", "run": "running",
            "rerun": "its config or inputs changed (or its output is gone): cleared, running again"}[action])
        if action != "skip":
            write_record(stage.folder, record)
            started = time.perf_counter()
            summary = run_command(stage, action == "resume")
            free_memory()
            record["wall_s"] = record.get("wall_s", 0.0) + time.perf_counter() - started  # over all attempts
            if summary.get("interrupted"):
                write_record(stage.folder, record)
                console.print(f"[yellow]{stage.name} interrupted; run the pipeline again to continue")
                return {"interrupted": True, "stages": records}
            record.update(status="done", output=str(stage.output), summary=summary)
            write_record(stage.folder, record)
        if stage.makes_model and cfg.eval is not None:
            evaluate_into(record, stage.output, stage.folder, cfg)
            console.print(f"[bold]{stage.name}[/bold]: {eval_line(record['eval'])}")
        records[stage.name] = record
        write_pipeline_report(out, [s.name for s in stages])
    report = write_pipeline_report(out, [s.name for s in stages])
    console.print(f"report: {report}/index.md · curves: {report}/curves.png")
    return {"interrupted": False, "stages": records}


def eval_line(m: dict[str, Any]) -> str:
    """pass@1, format rate and mean length in one line."""
    return (f"pass@1 {m['pass@1']:.3f} · format {m['format_rate']:.3f} · "
            f"{m['response_tokens']['mean']:.0f} tokens · eval {m['wall_s']:.0f} s")
