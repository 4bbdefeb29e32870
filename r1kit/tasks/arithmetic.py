"""Arithmetic problems generated from a seed; the verifier compares the final number."""

from __future__ import annotations

import random

from r1kit.tasks.base import Task
from r1kit.tasks.expr import evaluate

_OPERATORS = set("+-*/")


def _problem(rng: random.Random, digits: int, ops: str, terms: int) -> tuple[str, int]:
    low, high = 10 ** (digits - 1) if digits > 1 else 1, 10**digits - 1
    while True:
        numbers = [rng.randint(low, high) for _ in range(terms)]
        chosen = [rng.choice(ops) for _ in range(terms - 1)]
        expr = str(numbers[0]) + "".join(f" {op} {n}" for op, n in zip(chosen, numbers[1:], strict=True))
        value, _ = evaluate(expr)
        if value.denominator == 1:
            return expr, int(value)


def arithmetic(n: int = 100, digits: int = 2, ops: str = "+-*", terms: int = 2, seed: int = 0) -> Task:
    """`n` problems like 'What is 47 * 12?' with `terms` numbers of `digits` digits and operators from `ops`."""
    if not ops or set(ops) - _OPERATORS:
        raise ValueError(f"ops must be made of + - * /, got {ops!r}")
    if digits < 1 or terms < 2 or n < 1:
        raise ValueError("arithmetic needs digits >= 1, terms >= 2 and n >= 1")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        expr, value = _problem(rng, digits, ops, terms)
        rows.append({"id": i, "prompt": f"What is {expr}?", "answer": str(value), "expression": expr})
    return Task("arithmetic", rows, meta={"digits": digits, "ops": ops, "terms": terms, "seed": seed})
