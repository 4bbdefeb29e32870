"""A run's record: metrics.jsonl, TensorBoard events and sample completions, safe to resume into, and set
aside whole when a new run starts in its folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from r1kit import distributed

# what a GRPO or SFT run writes into its folder; anything else there is not the run's and stays
RUN_ENTRIES = ("config.yaml", "run.json", "metrics.jsonl", "samples.jsonl", "tensorboard", "checkpoints", "final",
               "report")


def set_aside(folder: Path) -> Path | None:
    """Move an earlier run's files from `folder` into a new sibling `<folder>.old-<time>`, so that a new run
    neither mixes its checkpoints and TensorBoard events with theirs nor deletes them; that folder, or None
    when `folder` holds no run (a config.yaml alone is from a run that failed before it began)."""
    found = [folder / name for name in RUN_ENTRIES if (folder / name).exists()]
    if all(path.name == "config.yaml" for path in found):
        return None
    base = folder.resolve()
    stamp, k = time.strftime("%Y%m%d-%H%M%S"), 1
    aside = base.with_name(f"{base.name}.old-{stamp}")
    while aside.exists():  # another run set aside within the same second
        k += 1
        aside = base.with_name(f"{base.name}.old-{stamp}-{k}")
    aside.mkdir()
    for path in found:
        path.rename(aside / path.name)
    return aside if folder.is_absolute() else Path(os.path.relpath(aside))  # as the user gave `folder`


def open_run_folder(out: Path, config: dict[str, Any], new_run: bool, console) -> None:
    """Make a run's folder and write its config.yaml; a new run first sets an earlier one there aside (never mixed
    with an old one) and says where it went."""
    if new_run and (aside := set_aside(out)) is not None:
        console.print(f"{out} held an earlier run: moved it to {aside} (resume=latest continues a run instead)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _keep_until(path: Path, step: int) -> None:
    """Drop lines of a JSONL file written after `step` (by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in lines))


class RunLog:
    """Appends per-step metrics to metrics.jsonl and TensorBoard, and sample completions to samples.jsonl; under
    torchrun on rank 0 alone (the metrics it is given are the whole step's), a no-op on the others."""

    def __init__(self, folder: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writes = distributed.world().is_main
        if not self.writes:
            return
        self.metrics_path, self.samples_path = folder / "metrics.jsonl", folder / "samples.jsonl"
        for path in (self.metrics_path, self.samples_path):
            if resume_step:
                _keep_until(path, resume_step)
            elif path.exists():
                path.unlink()
        self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        """One row of metrics.jsonl and a scalar per numeric value in TensorBoard."""
        if not self.writes:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Completions of this step, for the report's start / middle / end pages."""
        if not self.writes:
            return
        with self.samples_path.open("a") as f:
            f.writelines(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n" for s in samples)

    def close(self) -> None:
        if self.writes:
            self.tb.close()


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a run's JSONL file (metrics or samples); none if it does not exist."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
