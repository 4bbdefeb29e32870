"""Countdown: reach a target with the given numbers, each at most once, and + - * / ( )."""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

from r1kit.grading import last_boxed
from r1kit.prompts import ANSWER_CLOSE, ANSWER_OPEN
from r1kit.tasks.base import Row, Task
from r1kit.tasks.expr import evaluate

PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can be used at most once. Give the final equation in "
    "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)


def equation_of(completion: str) -> str | None:
    """The equation a completion proposes: last <answer> block, else last \\boxed{}; `= target` dropped."""
    text = None
    if ANSWER_OPEN in completion:
        text = completion.rsplit(ANSWER_OPEN, 1)[1].split(ANSWER_CLOSE, 1)[0]
    if not (text and text.strip()):
        text = last_boxed(completion)
    if not text:
        return None
    sides = [s.strip() for s in text.split("=")]
    with_ops = [s for s in sides if any(op in s for op in "+-*/×÷")]
    return with_ops[0] if with_ops else sides[0]


def equation_value(equation: str, numbers: list[int]) -> Fraction:
    """The value of an equation that uses only the given numbers, each at most once; raises ValueError."""
    value, used = evaluate(equation)
    extra = Counter(used) - Counter(numbers)
    if extra:
        raise ValueError(f"uses numbers not given (or reused): {sorted(extra.elements())}")
    return value


def check_equation(equation: str, numbers: list[int], target: int) -> bool:
    """Whether equation uses only given numbers, each at most once, and equals target; raises ValueError."""
    return equation_value(equation, numbers) == target


def equation_credit(completion: str, numbers: list[int]) -> float:
    """Partial credit for the answer's form, whatever its value: 0.5 for an <answer> block, 1.0 when it
    holds a valid equation of the given numbers (a small model that never writes one gets no signal)."""
    if ANSWER_OPEN not in completion:
        return 0.0
    equation = equation_of(completion)
    if equation is None:
        return 0.5
    try:
        equation_value(equation, numbers)
    except ValueError:
        return 0.5
    return 1.0


def countdown_verify(completion: str, row: Row) -> float:
    """1.0 when the proposed equation is valid and reaches the row's target."""
    equation = equation_of(completion)
    if equation is None:
        return 0.0
    try:
        return float(check_equation(equation, list(row["numbers"]), int(row["target"])))
    except ValueError:
        return 0.0


def _solvable(rng: random.Random, count: int, max_number: int) -> tuple[list[int], int]:
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        order = rng.sample(numbers, count)
        expr = str(order[0])
        for n in order[1:]:
            op = rng.choice("+-*/")
            expr = f"({expr}) {op} {n}" if rng.random() < 0.5 else f"{n} {op} ({expr})"
        try:
            value, _ = evaluate(expr)
        except ValueError:
            continue
        if value.denominator == 1 and 1 <= value <= 10 * max_number:
            return numbers, int(value)


def countdown(n: int = 100, numbers: int = 3, max_number: int = 50, seed: int = 0) -> Task:
    """`n` puzzles of `numbers` integers from 1 to `max_number`, each with a reachable target."""
    if n < 1 or numbers < 2 or max_number < 1:
        raise ValueError("countdown needs n >= 1, numbers >= 2 and max_number >= 1")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        nums, target = _solvable(rng, numbers, max_number)
        prompt = PROMPT.format(numbers=nums, target=target)
        rows.append({"id": i, "prompt": prompt, "answer": str(target), "numbers": nums, "target": target})
    return Task("countdown", rows, verify=countdown_verify, extract=lambda text, row: equation_of(text),
                same_answer=lambda a, b: a.replace(" ", "") == b.replace(" ", ""),
                meta={"numbers": numbers, "max_number": max_number, "seed": seed})
