"""`r1kit distill`: sample a teacher's verified traces, fine-tune the student on them, evaluate it before and after."""

from __future__ import annotations

from typing import Any

from r1kit.config import DistillConfig, PipelineConfig


def distill_pipeline(cfg: DistillConfig) -> PipelineConfig:
    """The two-stage pipeline a distill config stands for: `sample` by the teacher, `sft` of the student."""
    teacher = {"teacher": cfg.teacher, "teacher_url": cfg.teacher_url, "teacher_model": cfg.teacher_model}
    return PipelineConfig(model=cfg.student, task=cfg.task, data=cfg.data, task_args=cfg.task_args,
                          stages={"sample": {"kind": "sample", **teacher, **cfg.sample},
                                  "sft": {"kind": "sft", "model": "@base", "data": "@sample", **cfg.sft}},
                          eval=cfg.eval, device=cfg.device, out=cfg.out)


def run_distill(cfg: DistillConfig) -> dict[str, Any]:
    """The distill command: the student's evaluation before (base) and after (sft) in the pipeline's report."""
    from r1kit.pipeline.run import run_pipeline

    return run_pipeline(distill_pipeline(cfg))
