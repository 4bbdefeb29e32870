"""A pipeline stage: its command's config resolved from the pipeline, its inputs' identity, and its record.

A stage is a command (`sample`, `sft`, `train`) with settings. Settings it leaves out come from the
pipeline and the stages before it: the task and data, the model (the latest model made so far, or the
base), an SFT stage's data (the latest traces), a GRPO stage's held-out rows (the evaluation's data).
`@name` stands for a stage's output, `@base` for the base model. A stage's record (`stage.json`) holds
the sha256 of the settings that decide its output and of its inputs: a rerun skips the stage when both
are unchanged, resumes it when it was interrupted, and starts it afresh when either changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1kit.config import Config, ConfigError, PipelineConfig, SampleConfig, SFTConfig, TrainConfig, load_config
from r1kit.models import input_sha256

COMMANDS: dict[str, type[Config]] = {"sample": SampleConfig, "sft": SFTConfig, "train": TrainConfig}
RECORD = "stage.json"
INPUT_FIELDS = ("model", "teacher", "data", "eval_data", "eval_task_data")


@dataclass
class Stage:
    """One resolved stage: its command's config, where it writes, and what it hands on."""

    name: str
    kind: str
    config: Config
    folder: Path
    output: Path

    @property
    def makes_model(self) -> bool:
        """Whether the stage's output is a model (sft, train) rather than traces (sample)."""
        return self.kind != "sample"


def stage_output(kind: str, folder: Path) -> Path:
    """What a stage of this kind hands on: the trained model's folder, or the traces file."""
    return folder / "traces.jsonl" if kind == "sample" else folder / "final"


def resolve_stages(cfg: PipelineConfig) -> list[Stage]:
    """Every stage's config with the pipeline's defaults and `@` references filled in, in order."""
    if not cfg.stages:
        raise ConfigError("a pipeline needs at least one stage under `stages`")
    out = Path(cfg.out)
    outputs: dict[str, Path] = {}
    latest = {"model": cfg.model, "traces": None}
    stages = []
    for name, spec in cfg.stages.items():
        spec = dict(spec or {})
        kind = spec.pop("kind", None)
        if kind not in COMMANDS:
            raise ConfigError(f"stage {name!r}: kind must be one of {', '.join(COMMANDS)}, got {kind!r}")
        if name in ("base", "report") or "/" in name:
            raise ConfigError(f"stage {name!r}: choose another name ('base', 'report' and names with '/' are taken)")
        values = {key: _reference(value, name, cfg.model, outputs) for key, value in spec.items()}
        for key, value in _defaults(kind, cfg, latest).items():
            if key == "teacher" and values.get("teacher_url"):  # an endpoint needs no model of ours
                continue
            if key == "eval_data" and values.get("task", cfg.task) != cfg.task:  # held-out rows of another task
                continue
            values.setdefault(key, value)
        folder = out / name
        values["out"] = str(stage_output(kind, folder) if kind == "sample" else folder)
        try:
            config = load_config(COMMANDS[kind], None, values)
        except ConfigError as e:
            raise ConfigError(f"stage {name!r} ({kind}): {e}") from None
        stage = Stage(name, kind, config, folder, stage_output(kind, folder))
        stages.append(stage)
        outputs[name] = stage.output
        latest["model" if stage.makes_model else "traces"] = str(stage.output)
    return stages


def _reference(value: Any, stage: str, base: str, outputs: dict[str, Path]) -> Any:
    if isinstance(value, list):  # e.g. an sft stage's data: [@rejection_sampling, @cold_start_data]
        return [_reference(v, stage, base, outputs) for v in value]
    if not (isinstance(value, str) and value.startswith("@")):
        return value
    if value == "@base":
        return base
    if value[1:] not in outputs:
        raise ConfigError(f"stage {stage!r}: {value} names no earlier stage (earlier: "
                          f"{', '.join(outputs) or 'none'}; or @base)")
    return str(outputs[value[1:]])


def _defaults(kind: str, cfg: PipelineConfig, latest: dict[str, str | None]) -> dict[str, Any]:
    """The settings a stage of this kind takes from the pipeline when it gives none."""
    common = {"device": cfg.device}
    if kind == "sft":
        if latest["traces"] is None:
            return {**common, "model": latest["model"]}  # its own `data` is then required
        return {**common, "model": latest["model"], "data": latest["traces"]}
    task = {"task": cfg.task, "data": cfg.data, "task_args": cfg.task_args}
    if kind == "sample":
        return {**common, **task, "teacher": latest["model"]}
    # GRPO's held-out rows: the evaluation's data (else the last training rows, which an SFT stage before it
    # may have trained on)
    held_out = {"eval_data": cfg.eval["data"]} if cfg.eval and cfg.eval.get("data") else {}
    return {**common, **task, **held_out, "model": latest["model"]}


def config_sha256(config: Config) -> str:
    """sha256 of the settings of a resolved config that decide its output (not where or how fast it runs)."""
    return hashlib.sha256(json.dumps(config.work(), sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(stage: Stage) -> dict[str, Any]:
    """The stage's config and inputs as sha256s: what must match for a finished stage to be skipped."""
    values = stage.config.model_dump()
    inputs = {}  # setting (data[i] for a list) -> sha256 of the model or file it names
    for key in INPUT_FIELDS:
        if key == "teacher" and values.get("teacher_url"):
            continue  # an endpoint teacher: the model setting is not used
        named = values.get(key)
        for i, value in enumerate(named if isinstance(named, list) else [named]):
            sha = input_sha256(value) if isinstance(value, str) else None
            if sha is not None:
                inputs[key if not isinstance(named, list) else f"{key}[{i}]"] = sha
    return {"config_sha256": config_sha256(stage.config), "inputs": inputs}


def read_record(folder: Path) -> dict[str, Any] | None:
    """The record in a stage's folder, if it has one."""
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """Replace the record in a stage's folder (written whole, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(folder / RECORD)


def prepare(stage: Stage, fp: dict[str, Any]) -> str:
    """`skip` (finished with this config and inputs), `resume` (interrupted, same), `run` (never run), or
    `rerun` (its folder, from another config or other inputs, or with its output gone, is to be cleared first).
    It only reads, so that every rank of torchrun's decides alike before rank 0 clears anything."""
    record = read_record(stage.folder)
    same = record is not None and all(record.get(k) == v for k, v in fp.items())
    if same and record.get("status") == "done" and stage.output.exists():
        return "skip"
    if same and record.get("status") != "done":  # a finished stage whose output is gone runs again
        return "resume"
    return "rerun" if stage.folder.exists() else "run"
