"""`r1kit eval`: sample k completions per problem, verify them, and write results, samples and a summary."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import pickle
import signal
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r1kit import __version__, distributed
from r1kit.config import EvalConfig
from r1kit.eval.metrics import cons_at_k, length_stats, pass_at_k, pass_ks
from r1kit.eval.report import metrics_table, write_summary
from r1kit.prompts import build_prompt, resolve_template, split_trace
from r1kit.rewards import (
    format_reward,
    language_consistency_reward,
    reward_columns,
    score_completions,
    tag_count_reward,
)
from r1kit.rl.checkpoint import StopRequest
from r1kit.rollout import Completion, Generator, SamplingParams, make_generator, uses_engine
from r1kit.rollout.sampler import shifted_seed
from r1kit.tasks import Task, load_task

log = logging.getLogger("r1kit")
CORRECT = 0.5  # a sample counts as correct for pass@k / cons@k when its accuracy is at least this
EXTRACTED = "extracted answers"  # what cons@k votes on unless the task's meta names its grouping


@dataclass
class EvalRun:
    """What an evaluation produced: one record per sample, the seconds spent generating them and (this rank)
    scoring them, whether it stopped early (Ctrl-C or SIGTERM)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    generation_s: float = 0.0
    scoring_s: float = 0.0
    reward_failures: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False


def score_group(task: Task, rows: list[dict], prompts: list[str], completions: list[Completion],
                k: int, first: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A record per completion (k per row, in row order; rows[0] is the task's row `first`) with its trace,
    extracted answer and rewards."""
    flat_rows = [row for row in rows for _ in range(k)]
    flat_prompts = [p for p in prompts for _ in range(k)]
    texts = [c.text for c in completions]
    rewards = {"accuracy": (task.reward, 1.0), "format": (format_reward, 0.0),
               "tag_count": (tag_count_reward, 0.0), "language": (language_consistency_reward, 0.0)}
    scores = score_completions(rewards, texts, reward_columns(flat_rows, flat_prompts))
    records = []
    for i, (row, completion) in enumerate(zip(flat_rows, completions, strict=True)):
        reasoning, answer = split_trace(completion.text)
        records.append({
            "problem": row.get("id", first + i // k), "sample": i % k, "prompt": flat_prompts[i],
            "completion": completion.text, "reasoning": reasoning, "answer": answer,
            "extracted": task.extract(completion.text, row), "gold": row["answer"],
            "rewards": {name: s[i] for name, s in scores.per_reward.items()},
            "finish_reason": completion.finish_reason, "tokens": len(completion.token_ids),
        })
    return records, scores.failures


def evaluate(task: Task, generator: Generator, tokenizer, params: SamplingParams, template: str = "auto",
             chunk: int = 64, progress: Progress | None = None, on_records=None, run: EvalRun | None = None,
             world: distributed.World = distributed.ALONE, stop: StopRequest | None = None,
             background: bool = False) -> EvalRun:
    """Generate params.n samples per row of task and score each, filling run: rounds of chunk rows per rank of
    world, each rank sampling its contiguous part (the generator may start the next round before this one ends);
    every rank gets every record, in row order. With `stop`, all ranks stop after the round in which one of them
    was asked to. With `background`, a round is scored in a process of its own while the next generates."""
    run = run if run is not None else EvalRun()
    bar = progress.add_task(task.name, total=len(task) * params.n) if progress else None
    advance = (lambda n: progress.advance(bar, n)) if progress else None
    parts = []  # (this rank's rows of a round, the task's index of the first, their prompts)
    for start in range(0, len(task), chunk * world.size):
        first, end = world.span(len(task.rows[start : start + chunk * world.size]))
        rows = task.rows[start + first : start + end]
        parts.append((rows, start + first,
                      [build_prompt(row["prompt"], tokenizer, template, task.answer_format) for row in rows]))
    # the j-th sequence of row i samples as sequence i * n + j of one request over the whole task, so neither the
    # chunk nor the number of ranks changes what it draws
    rounds = ((prompts, params if params.seed is None else
               dataclasses.replace(params, seed=shifted_seed(params.seed, first * params.n)))
              for _, first, prompts in parts)
    generated = generator.generate_rounds(rounds, advance)
    scored = _scored_rounds(task, parts, generated, params.n, background)
    try:
        for records, failures, seconds, waited in scored:
            run.scoring_s += waited
            _add_round(run, world.gather((records, failures, seconds)), world, advance, on_records)
            if stop is not None and world.any(stop.requested)[0]:
                run.interrupted = True
                break
    finally:
        scored.close()  # stops the scoring process
        generated.close()  # a round queued ahead is dropped from the engine
    return run


def _score_part(task: Task, rows: list[dict], prompts: list[str], completions: list[Completion], k: int,
                first: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    return score_group(task, rows, prompts, completions, k, first) if rows else ([], {})


def _scored_rounds(task: Task, parts: list, generated: Iterator[list[Completion]], k: int, background: bool
                   ) -> Iterator[tuple[list[dict[str, Any]], dict[str, int], float, float]]:
    """(records, reward failures, generation seconds, seconds this process spent scoring or waiting for it) of
    each round, in order. In the background a process of its own scores a round while the next one generates:
    grading is CPU work (math-verify parses every sample twice), which would otherwise leave the GPU idle."""
    pool = _scoring_process(task) if background else None
    if pool is not None and parts and parts[0][0]:
        # a sample scored now: the process starts and imports its graders (seconds) while the first round generates
        rows, _, prompts = parts[0]
        pool.submit(_score_part, task.with_rows([]), rows[:1], prompts[:1], [Completion("\\boxed{0}", [])], 1, 0)
    pending: deque[tuple[Future, float]] = deque()
    try:
        for rows, first, prompts in parts:
            t0 = time.perf_counter()
            completions = next(generated)
            seconds = time.perf_counter() - t0
            if pool is None:
                records, failures = _score_part(task, rows, prompts, completions, k, first)
                yield records, failures, seconds, time.perf_counter() - t0 - seconds
                continue
            pending.append((pool.submit(_score_part, task.with_rows([]), rows, prompts, completions, k, first),
                            seconds))
            if len(pending) > 1:  # the round before this one, scored while this one generated
                yield _scored(*pending.popleft())
        while pending:
            yield _scored(*pending.popleft())
    finally:
        if pool is not None:
            pool.shutdown(wait=not pending, cancel_futures=True)


def _scored(future: Future, seconds: float) -> tuple[list[dict[str, Any]], dict[str, int], float, float]:
    t0 = time.perf_counter()
    records, failures = future.result()
    return records, failures, seconds, time.perf_counter() - t0


def _scoring_process(task: Task) -> ProcessPoolExecutor | None:
    """One spawned process to score rounds in (the task goes to it by pickle), or None where the task does not
    pickle (a verifier defined inside a function, say): then rounds are scored here."""
    try:
        pickle.dumps(task.with_rows([]))
    except Exception as error:  # noqa: BLE001 - any pickling failure means: score here
        log.info("scoring in this process: the task does not pickle (%s)", error)
        return None
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint)


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the eval stops and writes what it has; its scorer just goes
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _add_round(run: EvalRun, parts: list, world: distributed.World, advance, on_records) -> None:
    """Add a round's records, reward failures and generation seconds from every rank (in rank order) to run."""
    records = [r for part, _, _ in parts for r in part]
    for _, failures, _ in parts:
        for name, count in failures.items():
            run.reward_failures[name] = run.reward_failures.get(name, 0) + count
    run.generation_s += max(seconds for _, _, seconds in parts)  # the ranks generate side by side
    run.records.extend(records)
    if advance and world.size > 1:
        advance(len(records) - len(parts[world.rank][0]))  # the other ranks' samples
    if on_records:
        on_records(records)


def vote_keys(records: list[dict[str, Any]], same_answer, grouping: str = EXTRACTED
              ) -> tuple[list[str | None], Any, str]:
    """What cons@k votes on, how two votes are compared, and which it is: the task's extracted answers when it
    extracts any (`grouping` names them), else the final text after the reasoning, whitespace and case ignored
    (a task with its own verifier may extract nothing, and its majority vote must still see the answers)."""
    if any(r["extracted"] is not None for r in records):
        return [r["extracted"] for r in records], same_answer, grouping
    keys = [" ".join((r["answer"] or r["completion"]).split()).lower() or None for r in records]
    return keys, str.__eq__, "final text"


def summarize(records: list[dict[str, Any]], k: int, same_answer, generation_s: float,
              grouping: str = EXTRACTED) -> dict[str, Any]:
    """pass@1 (mean over k samples), pass@k, cons@k, format and truncation rates, lengths, throughput."""
    problems = [records[i : i + k] for i in range(0, len(records), k)]
    accuracy = [[s["rewards"]["accuracy"] for s in p] for p in problems]
    correct = [sum(a >= CORRECT for a in acc) for acc in accuracy]
    tokens = [s["tokens"] for s in records]
    metrics: dict[str, Any] = {
        "problems": len(problems), "samples_per_problem": k,
        "pass@1": sum(sum(a) / k for a in accuracy) / max(len(problems), 1),
    }
    for kk in pass_ks(k)[1:]:
        metrics[f"pass@{kk}"] = sum(pass_at_k(k, c, kk) for c in correct) / max(len(problems), 1)
    keys, same, metrics["cons_grouping"] = vote_keys(records, same_answer, grouping)
    metrics[f"cons@{k}"] = sum(
        cons_at_k(keys[i : i + k], [a >= CORRECT for a in acc], same)
        for i, acc in zip(range(0, len(records), k), accuracy, strict=True)) / max(len(problems), 1)
    metrics["format_rate"] = sum(s["rewards"]["format"] for s in records) / max(len(records), 1)
    metrics["language_consistency"] = sum(s["rewards"]["language"] for s in records) / max(len(records), 1)
    metrics["truncation_rate"] = sum(s["finish_reason"] == "length" for s in records) / max(len(records), 1)
    metrics["response_tokens"] = length_stats(tokens)
    metrics["generation_s"] = generation_s
    metrics["tokens_per_s"] = sum(tokens) / generation_s if generation_s > 0 else 0.0
    return metrics


def run_eval(cfg: EvalConfig, console: Console | None = None) -> dict[str, Any]:
    """The eval command: load model and task, evaluate with a progress bar, write the run folder. Under torchrun
    every rank samples its part of the rows; rank 0 alone writes the run folder, as one process would."""
    with distributed.rank_session(cfg.device, console) as (world, device, console):
        return eval_rank(cfg, world, device, console)


def eval_rank(cfg: EvalConfig, world: distributed.World, device: str, console: Console) -> dict[str, Any]:
    """run_eval as one rank of `world`, generating on `device`."""
    from r1kit.models import load_model, weights_sha256

    started = time.perf_counter()
    task = load_task(cfg.task, cfg.data, **cfg.task_args).head(cfg.limit)
    model, tokenizer = load_model(cfg.model, device, cfg.dtype)
    loaded_s = time.perf_counter() - started
    # the engine reserves KV per request and keeps a GPU busy with hundreds; HF pads a batch to its longest
    gpu_engine = model.device.type == "cuda" and uses_engine(cfg.backend, model)
    batch_size = cfg.batch_size or (512 if gpu_engine else 64)
    generator = make_generator(model, tokenizer, cfg.backend, batch_size, compile=cfg.compile)
    setup_s = time.perf_counter() - started - loaded_s
    params = SamplingParams(n=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            min_p=cfg.min_p, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    out = Path(cfg.out)
    samples_file = None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        samples_file = (out / "samples.jsonl").open("w", encoding="utf-8")

    def save(records: list[dict]) -> None:
        samples_file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        samples_file.flush()
        if not console.is_terminal:  # a log file gets no live bar: a line per chunk instead
            console.print(f"{task.name}: {len(run.records)}/{len(task) * cfg.samples} samples, "
                          f"{time.perf_counter() - started:.0f} s")

    # rounds of two batches' samples: the engine runs them into each other, so the batch stays full, and the last
    # round's grading (what nothing overlaps) is short
    chunk = max(1, 2 * batch_size // cfg.samples)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    run = EvalRun()
    # one process stops at once; torchrun's ranks stop together after the round they are in
    stop = StopRequest() if world.size > 1 else None
    try:
        with samples_file or contextlib.nullcontext(), Progress(*columns, console=console) as progress:
            # on a GPU, grading a round in another process overlaps generating the next (CPU tests score here)
            evaluate(task, generator, tokenizer, params, cfg.template, chunk, progress,
                     save if world.is_main else None, run, world, stop, background=gpu_engine)
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        if stop is not None:
            stop.restore()
    if run.interrupted:
        console.print("[yellow]interrupted: writing results for the problems finished so far")
    results = {
        "r1kit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"spec": cfg.model, "path": str(model.name_or_path), "sha256": weights_sha256(model.name_or_path),
                  "architecture": type(model).__name__, "dtype": str(model.dtype).removeprefix("torch."),
                  "device": str(model.device)},
        "task": {"name": task.name, "rows": len(task), **task.meta},
        "sampling": {**params.to_dict(), "template": resolve_template(cfg.template, tokenizer),
                     "backend": cfg.backend},
        "config": cfg.model_dump(),
        "metrics": summarize(run.records, cfg.samples, task.same_answer, run.generation_s,
                             task.meta.get("cons_grouping", EXTRACTED)),
        "reward_failures": run.reward_failures,
        "wall_s": time.perf_counter() - started,
        # where the wall time went: loading the model, setting up its generator (the engine's KV cache and buffers),
        # generating, waiting for grading (the rest: building prompts, gathers, writing samples, the weights' hash)
        "timings": {"load_s": loaded_s, "setup_s": setup_s, "generation_s": run.generation_s,
                    "scoring_s": run.scoring_s},
        "interrupted": run.interrupted,
    }
    if hasattr(generator, "engine"):  # where the rollout engine's time went (rank 0's engine under torchrun)
        results["engine_steps"] = dataclasses.asdict(generator.engine.counts)
    if not world.is_main:
        return results
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_summary(results, run.records, out / "summary.md")
    console.print(metrics_table(results))
    console.print(f"wrote {out}/results.json, samples.jsonl, summary.md")
    return results
