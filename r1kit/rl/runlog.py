"""A run's record: metrics.jsonl, TensorBoard events and sample completions, safe to resume into."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _keep_until(path: Path, step: int) -> None:
    """Drop lines of a JSONL file written after `step` (by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in lines))


class RunLog:
    """Appends per-step metrics to metrics.jsonl and TensorBoard, and sample completions to samples.jsonl."""

    def __init__(self, folder: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.metrics_path, self.samples_path = folder / "metrics.jsonl", folder / "samples.jsonl"
        for path in (self.metrics_path, self.samples_path):
            if resume_step:
                _keep_until(path, resume_step)
            elif path.exists():
                path.unlink()
        self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        """One row of metrics.jsonl and a scalar per numeric value in TensorBoard."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Completions of this step, for the report's start / middle / end pages."""
        with self.samples_path.open("a") as f:
            f.writelines(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n" for s in samples)

    def close(self) -> None:
        self.tb.close()


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a run's JSONL file (metrics or samples); none if it does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
