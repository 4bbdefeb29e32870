"""Tasks read from JSONL: the math benchmarks and the user's own data with a custom verifier."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from r1kit.tasks.base import DataError, Row, Task, map_fields, read_jsonl

BENCHMARK_FILES = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl", "aime": "aime24.jsonl",
                   "humaneval": "humaneval.jsonl"}
MATH_FORMAT = "JSONL with 'problem' and 'answer' on each line"


def benchmark_path(name: str, data: str | None, data_format: str = MATH_FORMAT) -> Path:
    """The JSONL file of a benchmark: `data` if given, else $R1KIT_DATA/<its usual file name>; the error says
    data_format, what the file holds."""
    if data:
        return Path(data)
    folder = os.environ.get("R1KIT_DATA")
    if folder and (Path(folder) / BENCHMARK_FILES[name]).is_file():
        return Path(folder) / BENCHMARK_FILES[name]
    raise DataError(
        f"task {name!r} needs its data: pass --data PATH ({data_format}), "
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


def _missing(module_name: str, e: Exception) -> bool:
    """Whether `e` says that the module itself (or its package) is not found, not one of its own imports."""
    name = getattr(e, "name", None)
    return isinstance(e, ModuleNotFoundError) and bool(name) and f"{module_name}.".startswith(f"{name}.")


def _import_module(module_name: str) -> ModuleType:
    """Import a module, also from the working directory, as `python -m` would (the console script does not)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if not _missing(module_name, e):
            raise
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a finder cached before the file was written would not see it
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(cwd)


def import_function(spec: str, what: str = "verifier") -> Callable:
    """The function `module:function` (also from the working directory) or `path/to/file.py:function`."""
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
            module = _import_module(module_name)
    except (ImportError, FileNotFoundError) as e:
        hint = ""
        if not module_name.endswith(".py") and _missing(module_name, e):
            hint = f"; not in the working directory either; a file works too: path/to/file.py:{attr}"
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({e}){hint}") from None
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
