"""`r1kit sample`: rejection sampling into SFT data, round by round, resumable after any kill.

Prompts go to the teacher `chunk` at a time. After a round its kept rows are appended to the output and
synced, then the progress file (rounds done, the output's size then, the counts) is replaced atomically.
A rerun truncates the output to the size the progress file records, dropping a half-written row or the
rows of an unfinished round, and starts at the next round. Each round's sampling seed depends only on
the round, so the rows come out as an uninterrupted run writes them.

Under torchrun a local teacher's rounds are split over the ranks: each generates its contiguous part of the round's
prompts, sampling each as it would at its place in a one-process round, and rank 0 writes the kept rows of all in
prompt order, so the output is the same bytes on any number of processes (and resumes on another number).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r1kit import distributed
from r1kit.config import SampleConfig
from r1kit.models import input_sha256, load_tokenizer
from r1kit.prompts import split_trace
from r1kit.rollout import Completion, SamplingParams
from r1kit.rollout.sampler import shifted_seed
from r1kit.sample.filters import REASONS, Candidate, judge
from r1kit.sample.teachers import LocalTeacher, SolutionsTeacher, make_teacher
from r1kit.tasks import Task, load_task


def progress_path(out: Path) -> Path:
    """Where a sample run keeps its progress: beside its output."""
    return out.with_name(out.name + ".progress.json")


def config_key(cfg: SampleConfig) -> str:
    """sha256 of what decides which rows are written: the settings (not where, nor how fast), the data file's
    bytes and the teacher's weights."""
    inputs = {"data": cfg.data and input_sha256(cfg.data),
              "teacher": None if cfg.teacher_url or cfg.teacher == "solutions" else input_sha256(cfg.teacher)}
    return hashlib.sha256(json.dumps({**cfg.work(), **inputs}, sort_keys=True).encode()).hexdigest()


def load_progress(cfg: SampleConfig, out: Path) -> dict[str, Any]:
    """The progress of an earlier run of this config (rounds done, output bytes, counts); fresh if none."""
    path = progress_path(out)
    if not path.is_file():
        if out.exists() and out.stat().st_size:
            raise ValueError(f"{out} exists and has no {path.name}: not a sample run's output; move it or choose "
                             "another out")
        return {"config": config_key(cfg), "rounds": 0, "bytes": 0, "counts": {}}
    progress = json.loads(path.read_text())
    if progress["config"] != config_key(cfg):
        raise ValueError(f"{out} was written with other settings ({path.name} differs); choose another out, or "
                         "delete both files to start over")
    return progress


def save_progress(out: Path, progress: dict[str, Any]) -> None:
    """Replace the progress file atomically (written, synced, renamed)."""
    path = progress_path(out)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(progress, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def kept_rows(task: Task, rows: list[dict], completions: list[Completion], n: int, cfg: SampleConfig,
              count_tokens, provenance: dict[str, Any], counts: dict[str, int]) -> list[dict[str, Any]]:
    """The rows to write for one round: each prompt's traces judged, the kept ones with their provenance."""
    max_tokens = cfg.filters.max_tokens or cfg.max_new_tokens
    out = []
    for i, row in enumerate(rows):
        group = completions[i * n : (i + 1) * n]
        rewards = task.reward([c.text for c in group], [row] * n)
        candidates = [Candidate(c.text, r, len(c.token_ids) or count_tokens(c.text), c.finish_reason)
                      for c, r in zip(group, rewards, strict=True)]
        for j, (c, verdict) in enumerate(zip(candidates, judge(candidates, row["prompt"], cfg.filters,
                                                                cfg.min_reward, max_tokens), strict=True)):
            counts[verdict or "kept"] = counts.get(verdict or "kept", 0) + 1
            if verdict is None:
                reasoning, answer = split_trace(c.text)
                out.append({"prompt": row["prompt"], "reasoning": reasoning, "answer": answer,
                            "gold": row["answer"], "id": row.get("id", row["_index"]), "sample": j,
                            "reward": c.reward, "tokens": c.tokens, **provenance})
    return out


def record_round(out: Path, progress: dict[str, Any], r: int, parts: list, world: distributed.World) -> None:
    """Round r done: add every rank's verdict counts (in rank order, so they keep a one-process run's order) to
    progress; rank 0 appends the kept rows, syncs them, and replaces the progress file."""
    counts = progress["counts"]
    for _, part in parts:
        for verdict, count in part.items():
            counts[verdict] = counts.get(verdict, 0) + count
    progress["rounds"] = r + 1
    if world.is_main:
        with out.open("ab") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for kept, _ in parts for row in kept).encode())
            f.flush()
            os.fsync(f.fileno())
            progress["bytes"] = f.tell()
        save_progress(out, progress)


def run_sample(cfg: SampleConfig, console: Console | None = None) -> dict[str, Any]:
    """The sample command; returns the counts of generated, kept and rejected traces (by reason). Under torchrun
    every rank generates its part of each round (a local teacher); rank 0 alone writes the output and prints."""
    with distributed.rank_session(cfg.device, console) as (world, device, console):
        return sample(cfg.model_copy(update={"device": device}), world, console)


def sample(cfg: SampleConfig, world: distributed.World, console: Console) -> dict[str, Any]:
    """run_sample as one rank of `world`."""
    out = Path(cfg.out)
    task = load_task(cfg.task, cfg.data, **cfg.task_args).head(cfg.limit)
    for i, row in enumerate(task.rows):
        row["_index"] = i
    progress = load_progress(cfg, out)  # every rank reads it before rank 0 replaces it, after the first round
    teacher = make_teacher(cfg, task.rows, task.answer_format)
    n = 1 if isinstance(teacher, SolutionsTeacher) else cfg.samples
    params = SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens)
    provenance: dict[str, Any] = teacher.identity()
    if not isinstance(teacher, SolutionsTeacher):
        provenance["sampling"] = {**params.to_dict(), "seed": cfg.seed, "template": cfg.template}
    tokenizer = teacher.tokenizer if isinstance(teacher, LocalTeacher) else load_tokenizer("default")

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def span(size: int) -> tuple[int, int]:
        """This rank's part of a round: the solutions and endpoint teachers are I/O bound, so rank 0 asks them for
        the whole round while the others wait for it at the round's gather."""
        if isinstance(teacher, LocalTeacher):
            return world.span(size)
        return (0, size) if world.is_main else (0, 0)

    size = out.stat().st_size if out.exists() else 0
    if size < progress["bytes"]:  # truncate would pad it with zero bytes
        raise ValueError(f"{out} is shorter than {progress_path(out).name} records ({size} < {progress['bytes']} "
                         "bytes): it was cut or replaced; delete both to start over")
    if world.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a+b") as f:
            f.truncate(progress["bytes"])  # a half-written row, or an unfinished round's rows
    rounds = range(0, len(task), cfg.chunk)
    columns = (TextColumn("[bold]sample"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.description}"))
    parts = []  # (round, its rows, this rank's part of them: rows[first:end])
    for r, start in enumerate(rounds):
        if r >= progress["rounds"]:
            rows = task.rows[start : start + cfg.chunk]
            parts.append((r, rows, *span(len(rows))))
    # the j-th trace of row i samples as trace (first + i) * n + j of its round (a seed per round), so the rows
    # drawn depend neither on how a round is split over ranks nor on where a run resumed
    teacher_rounds = (([row["prompt"] for row in rows[first:end]],
                       replace(params, seed=shifted_seed(cfg.seed * 1_000_003 + r, first * n)),
                       [row["_index"] for row in rows[first:end]]) for r, rows, first, end in parts)
    with Progress(*columns, console=console) as bar_view:
        done = min(len(task), progress["rounds"] * cfg.chunk)
        bar = bar_view.add_task("", total=len(task) * n, completed=done * n)
        generated = teacher.generate_rounds(teacher_rounds, lambda k: bar_view.advance(bar, k))
        try:
            for r, rows, first, end in parts:
                mine, part_counts = rows[first:end], {}
                kept = kept_rows(task, mine, next(generated), n, cfg, count_tokens, provenance, part_counts)
                gathered = world.gather((kept, part_counts))
                bar_view.advance(bar, (len(rows) - len(mine)) * n)  # the other ranks' traces
                record_round(out, progress, r, gathered, world)
                counts = progress["counts"]
                bar_view.update(bar, description=f"kept {counts.get('kept', 0)} of {sum(counts.values())}")
        finally:
            generated.close()  # a round queued ahead is dropped from the engine
    counts = {"generated": sum(progress["counts"].values()), "kept": progress["counts"].get("kept", 0),
              **{f"rejected_{k}": progress["counts"].get(k, 0) for k in REASONS}}
    rejected = ", ".join(f"{k.removeprefix('rejected_')} {v}" for k, v in counts.items()
                         if k.startswith("rejected_") and v)
    console.print(f"kept {counts['kept']} of {counts['generated']} traces -> {out}; rejected: {rejected or 'none'}")
    return counts
