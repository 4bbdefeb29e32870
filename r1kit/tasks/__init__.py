"""Built-in tasks: each is rows (`prompt`, `answer`, metadata) plus a verifier."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from r1kit.tasks.addition import addition
from r1kit.tasks.arithmetic import arithmetic
from r1kit.tasks.base import DataError, Row, Task, read_jsonl
from r1kit.tasks.code import code_jsonl, functions, humaneval
from r1kit.tasks.countdown import countdown
from r1kit.tasks.datasets import aime, gsm8k, jsonl, math500

TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": arithmetic,
    "addition": addition,
    "countdown": countdown,
    "gsm8k": gsm8k,
    "math500": math500,
    "aime": aime,
    "jsonl": jsonl,
    "humaneval": humaneval,
    "code_jsonl": code_jsonl,
    "functions": functions,
}

__all__ = ["TASKS", "DataError", "Row", "Task", "load_task", "read_jsonl", "task_options"]


def task_options(name: str) -> dict[str, Any]:
    """A task's options and their defaults."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return {p.name: p.default for p in inspect.signature(TASKS[name]).parameters.values()}


def load_task(name: str, data: str | None = None, **options: Any) -> Task:
    """Build a task by name; `data` is the JSONL path of data-backed tasks."""
    allowed = task_options(name)
    if data is not None:
        if "data" not in allowed:
            raise ValueError(f"task {name!r} generates its rows and takes no data file")
        options["data"] = data
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"task {name!r} has no option {', '.join(sorted(unknown))}; "
                         f"its options: {', '.join(allowed) or 'none'}")
    return TASKS[name](**options)
