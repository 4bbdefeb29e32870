"""Tasks read from JSONL: the math benchmarks and the user's own data with a custom verifier."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from r1kit.tasks.base import DataError, Row, Task, map_fields, read_jsonl

BENCHMARK_FILES = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl", "aime": "aime24.jsonl"}


def benchmark_path(name: str, data: str | None) -> Path:
    """The JSONL file of a benchmark: `data` if given, else $R1KIT_DATA/<its usual file name>."""
    if data:
        return Path(data)
    folder = os.environ.get("R1KIT_DATA")
    if folder and (Path(folder) / BENCHMARK_FILES[name]).is_file():
        return Path(folder) / BENCHMARK_FILES[name]
    raise DataError(
        f"task {name!r} needs its data: pass --data PATH (JSONL with 'problem' and 'answer' on each line), "
        f"or set R1KIT_DATA to a folder holding {BENCHMARK_FILES[name]}"
    )


def _benchmark(name: str) -> Callable[..., Task]:
    def build(data: str | None = None) -> Task:
        path = benchmark_path(name, data)
        rows = map_fields(read_jsonl(path), path, "problem", "answer")
        return Task(name, rows, meta={"data": str(path)})

    build.__doc__ = f"{name} problems from JSONL (`problem`, `answer`); graded with math-verify."
    return build


gsm8k, math500, aime = (_benchmark(n) for n in ("gsm8k", "math500", "aime"))


def import_function(spec: str, what: str = "verifier") -> Callable:
    """The function `module:function` (or `path/to/file.py:function`)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} must be 'module:function', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            spec_ = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec_ is None or spec_.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as e:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{what} {spec!r}: {module_name!r} has no function {attr!r}")
    return fn


def load_verifier(spec: str) -> Callable[[str, Row], float]:
    """A verifier `module:function` called as fn(completion, row), its result read as a float."""
    fn = import_function(spec)
    return lambda completion, row: float(fn(completion, row))


def jsonl(data: str | None = None, prompt_field: str = "prompt", answer_field: str = "answer",
          verifier: str | None = None) -> Task:
    """Your own JSONL data: fields mapped to prompt/answer; math-verify or a `module:function` verifier."""
    if not data:
        raise DataError("task 'jsonl' needs --data PATH to a JSONL file")
    rows = map_fields(read_jsonl(data), data, prompt_field, answer_field)
    task = Task("jsonl", rows, meta={"data": str(data), "verifier": verifier or "math-verify"})
    if verifier:
        task.verify = load_verifier(verifier)
    return task
