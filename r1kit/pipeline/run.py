"""`r1kit pipeline`: run the stages in order (skipping finished ones), evaluate each model, write the report.

Under torchrun every rank runs every stage and evaluation, each of which splits its work over the ranks; rank 0 alone
writes the stage records and the report, and prints. Every rank reads the same records, so all take the same
decisions (skip, resume, run); rank 0 changes a stage's folder only once all have read it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from r1kit import distributed
from r1kit.config import Config, EvalConfig, PipelineConfig, load_config
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

C = TypeVar("C", bound=Config)
EVAL_KEYS = ("pass@1", "format_rate", "language_consistency", "truncation_rate", "response_tokens", "problems",
             "samples_per_problem")


def free_memory() -> None:
    """Hand a finished stage's GPU memory back before the next stage loads its model."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def on_rank(config: C, world: distributed.World) -> C:
    """config with this rank's own device: a command run within the pipeline's process group takes its device as it
    is, where one started by torchrun would pick its rank's GPU."""
    if world.size == 1:
        return config
    return config.model_copy(update={"device": distributed.rank_device(config.device, world.local_rank)})


def run_command(stage: Stage, resume: bool, world: distributed.World) -> dict[str, Any]:
    """Run a stage's command on every rank; an interrupted SFT or GRPO stage continues from its last checkpoint."""
    config = on_rank(stage.config, world)
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
    if not summary.get("interrupted") and world.is_main:
        write_training_report(stage.folder)
    return summary


def evaluate_into(record: dict[str, Any], model: Path | str, folder: Path, cfg: PipelineConfig,
                  world: distributed.World) -> None:
    """Evaluate the model with the pipeline's eval settings into its record (written to folder by rank 0), unless
    the record already holds an evaluation of the same weights with the same settings."""
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
    results = run_eval(on_rank(eval_cfg, world))
    free_memory()
    record["eval"] = {"model_sha256": sha, "settings_sha256": key, "wall_s": time.perf_counter() - started,
                      **{k: results["metrics"][k] for k in EVAL_KEYS}}
    if world.is_main:
        write_record(folder, record)


def run_pipeline(cfg: PipelineConfig, console: Console | None = None) -> dict[str, Any]:
    """The pipeline command: each stage run or skipped, each model evaluated, one report; the stage records."""
    stages = resolve_stages(cfg)  # every stage's config checked before anything runs
    with distributed.rank_session(cfg.device, console) as (world, _, console):
        return pipeline(cfg, stages, world, console)


def pipeline(cfg: PipelineConfig, stages: list[Stage], world: distributed.World, console: Console
             ) -> dict[str, Any]:
    """run_pipeline as one rank of `world`."""
    out = Path(cfg.out)
    records: dict[str, dict[str, Any]] = {}
    if cfg.eval is not None:
        base = out / "base"
        record = read_record(base) or {"kind": "base", "model": cfg.model, "status": "done"}
        evaluate_into(record, cfg.model, base, cfg, world)
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
            world.barrier()  # every rank has read the stage's folder before rank 0 changes it
            if world.is_main:
                if action == "rerun":
                    shutil.rmtree(stage.folder)
                write_record(stage.folder, record)
            world.barrier()
            started = time.perf_counter()
            summary = run_command(stage, action == "resume", world)
            free_memory()
            world.barrier()  # rank 0 writes the stage's output (final/, the traces) after the others are done
            record["wall_s"] = record.get("wall_s", 0.0) + time.perf_counter() - started  # over all attempts
            if summary.get("interrupted"):  # on every rank alike: the commands stop all ranks together
                if world.is_main:
                    write_record(stage.folder, record)
                console.print(f"[yellow]{stage.name} interrupted; run the pipeline again to continue")
                return {"interrupted": True, "stages": records}
            record.update(status="done", output=str(stage.output), summary=summary)
            if world.is_main:
                write_record(stage.folder, record)
        if stage.makes_model and cfg.eval is not None:
            evaluate_into(record, stage.output, stage.folder, cfg, world)
            console.print(f"[bold]{stage.name}[/bold]: {eval_line(record['eval'])}")
        records[stage.name] = record
        if world.is_main:
            write_pipeline_report(out, [s.name for s in stages])
    if world.is_main:
        report = write_pipeline_report(out, [s.name for s in stages])
        console.print(f"report: {report}/index.md · curves: {report}/curves.png")
    return {"interrupted": False, "stages": records}


def eval_line(m: dict[str, Any]) -> str:
    """pass@1, format rate and mean length in one line."""
    return (f"pass@1 {m['pass@1']:.3f} · format {m['format_rate']:.3f} · "
            f"{m['response_tokens']['mean']:.0f} tokens · eval {m['wall_s']:.0f} s")
