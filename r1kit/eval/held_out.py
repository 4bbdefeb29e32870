"""Held-out accuracy during training (GRPO or SFT): rows never trained on, scored greedy and sampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from rich.progress import Progress

from r1kit import distributed
from r1kit.eval.harness import evaluate, summarize
from r1kit.rollout import Generator, SamplingParams
from r1kit.tasks import Task, load_task, task_options

HELD_OUT_SEED = 10_000  # generated tasks draw held-out rows from here on, far from training seeds


@dataclass(frozen=True)
class HeldOut:
    """Held-out rows and how they are sampled: greedy once, and `samples` times at `temperature`."""

    task: Task
    template: str
    max_tokens: int
    samples: int = 1
    temperature: float = 1.0
    seed: int = 0


def generated_rows(name: str, data: str | None, task_args: dict[str, Any], eval_args: dict[str, Any],
                   problems: int) -> Task:
    """Held-out rows of a task: its training options overridden by eval_args; a generated task's drawn from
    HELD_OUT_SEED (unless eval_args set a seed), `problems` of them; a data task's first `problems` rows."""
    options = task_options(name)
    args = {**task_args, **eval_args}
    if "seed" in options and "seed" not in eval_args:
        args["seed"] = HELD_OUT_SEED
    if "n" in options and "n" not in eval_args:
        args["n"] = problems
    return load_task(name, data, **args).head(problems)


def held_out_accuracy(model, generator: Generator, tokenizer, held: HeldOut, autocast,
                      progress: Progress | None = None, world: distributed.World = distributed.ALONE
                      ) -> dict[str, float]:
    """Greedy and sampled accuracy, format rate and length on the held-out rows, the model in eval mode (a bar
    for each on `progress`, when given); the generator must already hold the model's current weights. Each rank
    of world samples its part of the rows; all get the figures of the whole."""
    settings = {"greedy": SamplingParams(n=1, temperature=0.0, max_tokens=held.max_tokens),
                "sampled": SamplingParams(n=held.samples, temperature=held.temperature, max_tokens=held.max_tokens,
                                          seed=held.seed + HELD_OUT_SEED)}
    was_training = model.training
    model.eval()
    results = {}
    with torch.no_grad(), autocast:
        for name, params in settings.items():
            task = held.task.with_rows(held.task.rows)
            task.name = f"held-out {name}"  # what the bar says
            chunk = -(-len(task) // world.size)  # one round
            run = evaluate(task, generator, tokenizer, params, held.template, chunk, progress, world=world)
            m = summarize(run.records, params.n, held.task.same_answer, run.generation_s)
            results[f"eval/{name}_accuracy"] = m["pass@1"]
            results[f"eval/{name}_format_rate"] = m["format_rate"]
            results[f"eval/{name}_length_mean"] = m["response_tokens"]["mean"]
    model.train(was_training)
    return results
