"""Addition of two integers with the answer after 'Answer:' (the GRPO issue's easy and hard tasks)."""

from __future__ import annotations

import random
import re

from r1kit.tasks.base import Row, Task

PROMPT = "What is {a} + {b}? Put the final answer after 'Answer:'."
_INTEGER = re.compile(r"-?\d+")


def last_integer(text: str) -> int | None:
    """The last integer written in text."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def answer_after_marker(text: str) -> int | None:
    """The first integer after the last 'Answer:' in text."""
    if "Answer:" not in text:
        return None
    found = _INTEGER.findall(text.rsplit("Answer:", 1)[1])
    return int(found[0]) if found else None


def addition(n: int = 1000, low: int = 1, high: int = 50, seed: int = 0, strict: bool = False) -> Task:
    """`n` problems 'What is a + b?' with a, b from low to high; row i drawn from Random(seed + i).

    Lenient (strict=false): the completion's last integer must be the sum. Strict: the first integer
    after 'Answer:' must be.
    """
    if n < 1 or low > high:
        raise ValueError("addition needs n >= 1 and low <= high")
    rows = []
    for i in range(n):
        rng = random.Random(seed + i)
        a, b = rng.randint(low, high), rng.randint(low, high)
        rows.append({"id": i, "prompt": PROMPT.format(a=a, b=b), "answer": str(a + b)})
    extract = answer_after_marker if strict else last_integer

    def verify(completion: str, row: Row) -> float:
        return float(extract(completion) == int(row["answer"]))

    return Task("addition", rows, verify=verify, extract=lambda text, row: _str(extract(text)),
                meta={"low": low, "high": high, "seed": seed, "strict": strict})


def _str(value: int | None) -> str | None:
    return None if value is None else str(value)
