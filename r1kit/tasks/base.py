"""The Task type (rows + verifier) and the JSONL reader every data-backed task uses."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1kit.grading import extract_answer, is_equiv, score_answer
from r1kit.prompts import BOXED

Row = dict[str, Any]


class DataError(ValueError):
    """Bad task data; the message names the file and line."""


def completion_text(completion: Any) -> str:
    """The text of a completion given as a string or as TRL's list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion is a string or a list of messages, not {type(completion).__name__}")


def math_verify_row(completion: str, row: Row) -> float:
    """The default verifier: the final answer is mathematically equal to the row's `answer`."""
    return score_answer(completion, str(row["answer"]))


def math_extract(completion: str, row: Row) -> str | None:
    """The default answer extractor: math-verify's final answer (\\boxed{} first), else the <answer> block."""
    return extract_answer(completion)


@dataclass
class Task:
    """Rows (each with `prompt` and `answer`) and how a completion is verified against a row."""

    name: str
    rows: list[Row]
    verify: Callable[[str, Row], float] = math_verify_row
    extract: Callable[[str, Row], str | None] = math_extract
    same_answer: Callable[[str, str], bool] = is_equiv
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def answer_format(self) -> str:
        """How the `chat` template's system prompt asks for this task's final answer (meta's, else in \\boxed{})."""
        return self.meta.get("answer_format", BOXED)

    def reward(self, completions: list[Any], row: list[Row], **kwargs: Any) -> list[float]:
        """The verifier as a TRL-style reward function over the `row` column."""
        return [self.verify(completion_text(c), r) for c, r in zip(completions, row, strict=True)]

    def with_rows(self, rows: list[Row]) -> Task:
        """The same task (its kind, verifier, extractor, metadata) over other rows."""
        return dataclasses.replace(self, rows=rows)

    def head(self, limit: int | None) -> Task:
        """The same task on its first `limit` rows."""
        return self if limit is None else self.with_rows(self.rows[:limit])


def read_jsonl(path: str | Path) -> list[Row]:
    """Rows of a JSONL file; a malformed line raises DataError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return [dict(row, _line=lineno) for lineno, row in rows]


def map_fields(rows: list[Row], path: str | Path, prompt_field: str, answer_field: str) -> list[Row]:
    """Rows with `prompt` and `answer` taken from the named fields; a missing field names file and line."""
    out = []
    for row in rows:
        for name in (prompt_field, answer_field):
            if name not in row:
                fields = ", ".join(k for k in row if k != "_line")
                raise DataError(f"{path}:{row['_line']}: missing field {name!r} (fields: {fields})")
        out.append({**row, "prompt": str(row[prompt_field]), "answer": str(row[answer_field])})
    return out
