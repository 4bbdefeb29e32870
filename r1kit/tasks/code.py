"""Code tasks: HumanEval, your own JSONL (assert tests or stdin/stdout cases) and generated function problems.

The candidate is the completion's last fenced Python block after the reasoning; it runs with its tests in the
sandbox (r1kit.sandbox), a whole batch of candidates in one parallel pool.
"""

from __future__ import annotations

import ast
import copy
import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1kit.prompts import split_trace
from r1kit.sandbox import Job, Outcome, check_sandbox, score_many
from r1kit.tasks.base import DataError, Row, Task, completion_text, read_jsonl
from r1kit.tasks.datasets import benchmark_path

# the row fields that say how a candidate is judged (code_reward reads the same names as TRL columns)
CODE_FIELDS = ("tests", "inputs", "outputs", "test", "entry_point", "code_prompt")
CONS_GROUPING = "normalised program text"  # cons@k votes on programs equal after ast.unparse
FENCE_NOTE = "Give it in a ```python code block."
HUMANEVAL_PROMPT = "Complete this Python function and give the whole function in a ```python code block.\n\n" \
                   "```python\n{code}```"
STDIO_NOTE = "Write a Python program that reads standard input and prints the answer. " + FENCE_NOTE
PYTHON_TAGS = frozenset({"python", "python3", "py", "py3"})
_FENCE = re.compile(r"^[ \t]*```+[ \t]*([^\s`]*)[^\n]*$", re.MULTILINE)


# --- the candidate ------------------------------------------------------------------------------------------


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, code) of each fenced block, fences paired in order; an unclosed last fence runs to the end."""
    fences = list(_FENCE.finditer(text))
    blocks = []
    for i in range(0, len(fences), 2):
        end = fences[i + 1].start() if i + 1 < len(fences) else len(text)
        blocks.append((fences[i][1].lower(), text[fences[i].end() + 1 : end]))
    return blocks


def last_code_block(completion: str) -> str | None:
    """The candidate: the last non-empty block tagged Python (else untagged) after the reasoning, or None.

    The reasoning is cut off as split_trace does: after `</think>`, and nothing when `<think>` never closes.
    An untagged block counts only when no block is tagged Python, so output shown after the code is not run.
    """
    blocks = [(tag, code) for tag, code in code_blocks(split_trace(completion)[1]) if code.strip()]
    python = [code for tag, code in blocks if tag in PYTHON_TAGS] or [code for tag, code in blocks if not tag]
    return python[-1].rstrip() + "\n" if python else None


def extract_program(completion: str, row: Row) -> str | None:
    """A code task's extractor: the candidate program (the row plays no part)."""
    return last_code_block(completion)


@functools.lru_cache(maxsize=4096)
def normalized_program(program: str) -> str:
    """The program as ast.unparse writes it (comments and layout dropped), or its words when it does not parse."""
    for source in (program, "def _():\n" + program):  # a completion-only body parses inside a function
        try:
            return ast.unparse(ast.parse(source))
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # untrusted text: whatever ast refuses
            continue
    return " ".join(program.split())


def same_program(a: str, b: str) -> bool:
    """Whether two programs are the same after normalisation (cons@k's vote)."""
    return normalized_program(a) == normalized_program(b)


# --- judging ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scoring:
    """How candidates are judged: partial credit (share of tests passed), the time limit, the unsafe opt-out."""

    partial: bool = False
    timeout_s: float = 5.0
    unsafe_no_sandbox: bool = False


def row_jobs(program: str, row: Row) -> list[Job]:
    """The sandbox runs that judge a program on a row: one per stdin case, or one with the assert tests, or
    HumanEval's `check(entry_point)` after the row's `code_prompt` (its imports, helpers and signature)."""
    if row.get("inputs") is not None:
        return [Job(program, stdin=case) for case in row["inputs"]]
    if row.get("tests") is not None:
        return [Job(program, row["tests"])]
    if row.get("entry_point") is not None and row.get("test") is not None:
        prefix = row.get("code_prompt") or ""
        if prefix and not prefix.endswith("\n"):
            prefix += "\n"
        return [Job(prefix + program, [f"{row['test']}\ncheck({row['entry_point']})\n"])]
    raise ValueError("a code row needs `tests`, `inputs` and `outputs`, or `test` and `entry_point`")


def output_lines(text: str) -> list[str]:
    """Stdout as compared: stripped, each line's whitespace runs made one space."""
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def credit(outcomes: Sequence[Outcome], row: Row, partial: bool) -> float:
    """A program's score on a row from its runs: the share of tests (or stdin cases) passed, or all-or-nothing."""
    if row.get("inputs") is not None:
        hits = [o.passed and output_lines(o.stdout) == output_lines(expected)
                for o, expected in zip(outcomes, row["outputs"], strict=True)]
        share = sum(hits) / len(hits)
    else:
        (outcome,) = outcomes
        share = outcome.fraction
    return share if partial else float(share == 1.0)


def score_programs(programs: Sequence[str | None], rows: Sequence[Row], scoring: Scoring) -> list[float]:
    """Each program's credit on its row, every sandbox run of the batch in one parallel pool; None scores 0.

    The sandbox never raises for what a candidate does: a hung or crashing one scores 0 within its time limit.
    """
    plans = [row_jobs(p, r) if p is not None else [] for p, r in zip(programs, rows, strict=True)]
    jobs = [job for plan in plans for job in plan]
    outcomes = iter(score_many(jobs, timeout_s=scoring.timeout_s, unsafe_no_sandbox=scoring.unsafe_no_sandbox)
                    if jobs else ())
    return [credit([next(outcomes) for _ in plan], row, scoring.partial) if plan else 0.0
            for plan, row in zip(plans, rows, strict=True)]


def verify_code(completion: str, row: Row, scoring: Scoring) -> float:
    """A code task's verifier for one completion (the batched path is CodeTask.reward)."""
    return score_programs([last_code_block(completion)], [row], scoring)[0]


@dataclass
class CodeTask(Task):
    """A Task whose candidates run in the sandbox; `reward` judges a whole batch in one pool."""

    scoring: Scoring = field(default_factory=Scoring)

    def reward(self, completions: list[Any], row: list[Row], **kwargs: Any) -> list[float]:
        """The verifier as a TRL-style reward over the `row` column, all candidates scored together."""
        return score_programs([last_code_block(completion_text(c)) for c in completions], row, self.scoring)


ANSWER_FORMAT = "in a ```python code block"  # what the `chat` template's system prompt asks for


def code_task(name: str, rows: list[Row], scoring: Scoring, meta: dict[str, Any]) -> CodeTask:
    """A code task over rows; the sandbox is started once first, so a refused kernel fails here, clearly."""
    if not scoring.unsafe_no_sandbox:
        check_sandbox()
    return CodeTask(name, rows, verify=functools.partial(verify_code, scoring=scoring), extract=extract_program,
                    same_answer=same_program, scoring=scoring,
                    meta={**meta, "partial": scoring.partial, "timeout_s": scoring.timeout_s,
                          "unsafe_no_sandbox": scoring.unsafe_no_sandbox, "cons_grouping": CONS_GROUPING,
                          "answer_format": ANSWER_FORMAT})


# --- HumanEval and your own JSONL ---------------------------------------------------------------------------


def _require(row: Row, path: str | Path, names: Sequence[str]) -> None:
    missing = [name for name in names if name not in row]
    if missing:
        fields = ", ".join(k for k in row if k != "_line")
        raise DataError(f"{path}:{row['_line']}: missing field {', '.join(map(repr, missing))} (fields: {fields})")


def humaneval(data: str | None = None, timeout_s: float = 5.0, unsafe_no_sandbox: bool = False) -> CodeTask:
    """HumanEval-format JSONL (task_id, prompt, test, entry_point); passes when check(entry_point) does.

    The candidate always follows the row's prompt code: a completion-only body continues its signature, and a
    whole function replaces its docstring-only stub while keeping its imports and helper functions.
    """
    path = benchmark_path("humaneval", data, "HumanEval's JSONL: task_id, prompt, test, entry_point")
    rows = []
    for row in read_jsonl(path):
        _require(row, path, ("task_id", "prompt", "test", "entry_point"))
        code = row["prompt"]
        rows.append({**row, "id": row["task_id"], "prompt": HUMANEVAL_PROMPT.format(code=code), "code_prompt": code,
                     "answer": code + row.get("canonical_solution", "")})
    return code_task("humaneval", rows, Scoring(False, timeout_s, unsafe_no_sandbox), {"data": str(path)})


def _cases(value: Any) -> list[str]:
    """A stdin/stdout case list; a case given as a list of lines is joined."""
    return ["\n".join(map(str, c)) if isinstance(c, list) else str(c) for c in value]


def code_row(row: Row, path: str | Path, prompt_field: str, instruction: bool) -> Row:
    """A code JSONL row made a task row: assert tests as a list, or stdin/stdout cases, and the prompt to show."""
    _require(row, path, (prompt_field,))
    where = f"{path}:{row['_line']}"
    note = FENCE_NOTE
    if "tests" in row:
        tests = [row["tests"]] if isinstance(row["tests"], str) else list(row["tests"])
        if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise DataError(f"{where}: 'tests' must be a string or a non-empty list of strings (assert statements)")
        fields: Row = {"tests": tests}
    elif "inputs" in row or "outputs" in row:
        _require(row, path, ("inputs", "outputs"))
        inputs, outputs = _cases(row["inputs"]), _cases(row["outputs"])
        if not inputs or len(inputs) != len(outputs):
            raise DataError(f"{where}: 'inputs' and 'outputs' must be lists of the same non-zero length")
        fields, note = {"inputs": inputs, "outputs": outputs}, STDIO_NOTE
    else:
        raise DataError(f"{where}: a code row needs 'tests' (asserts) or 'inputs' and 'outputs' (stdin/stdout)")
    prompt = str(row[prompt_field]) + (f"\n\n{note}" if instruction else "")
    return {**row, **fields, "prompt": prompt, "answer": str(row.get("answer", row.get("solution", "")))}


def code_jsonl(data: str | None = None, prompt_field: str = "prompt", partial: bool = False, instruction: bool = True,
               timeout_s: float = 5.0, unsafe_no_sandbox: bool = False) -> CodeTask:
    """Your JSONL of code problems: `tests` (assert strings) or `inputs`/`outputs` (stdin/stdout cases)."""
    if not data:
        raise DataError("task 'code_jsonl' needs --data PATH to a JSONL file")
    rows = [code_row(row, data, prompt_field, instruction) for row in read_jsonl(data)]
    return code_task("code_jsonl", rows, Scoring(partial, timeout_s, unsafe_no_sandbox), {"data": str(data)})


# --- generated function problems ----------------------------------------------------------------------------

WORDS = ("apple", "banana", "kite", "lemon", "moon", "grape", "house", "echo", "jam", "river", "stone", "cloud",
         "noon", "level", "radar")


def _ints(rng: random.Random, low: int = -20, high: int = 20, most: int = 8) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(0, most))]


def _maybe_palindrome(rng: random.Random) -> str:
    half = "".join(rng.choice("abcd") for _ in range(rng.randint(1, 3)))
    return rng.choice([half + half[::-1], half + rng.choice("xyz") + half[::-1], half + rng.choice("abcd")])


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS).capitalize() if rng.random() < 0.2 else rng.choice(WORDS)
                    for _ in range(rng.randint(0, 5)))


@dataclass(frozen=True)
class Template:
    """A kind of function problem: name, parameters, what it returns, a reference body and random arguments.

    `returns` and `body` may hold {placeholders} filled from `params` (so a body has no other braces).
    """

    name: str
    args: str
    returns: str
    body: str
    draw: Callable[[random.Random], tuple]
    params: Callable[[random.Random], dict[str, Any]] = lambda rng: {}


TEMPLATES = (
    Template("sum_even", "xs", "the sum of the even numbers in the list xs",
             "return sum(x for x in xs if x % 2 == 0)", lambda r: (_ints(r),)),
    Template("count_multiples", "xs", "how many numbers in the list xs are divisible by {k}",
             "return sum(1 for x in xs if x % {k} == 0)", lambda r: (_ints(r),), lambda r: {"k": r.randint(2, 9)}),
    Template("spread", "xs", "the largest number of the non-empty list xs minus the smallest",
             "return max(xs) - min(xs)", lambda r: (_ints(r) or [r.randint(-9, 9)],)),
    Template("shift_all", "xs", "a new list with {k} added to each number of xs",
             "return [x + {k} for x in xs]", lambda r: (_ints(r),), lambda r: {"k": r.choice([-3, -2, 2, 3, 5, 10])}),
    Template("above", "xs", "the numbers of xs that are greater than {k}, in their original order",
             "return [x for x in xs if x > {k}]", lambda r: (_ints(r),), lambda r: {"k": r.randint(-5, 5)}),
    Template("reverse_words", "s", "the words of s in reverse order, joined by single spaces",
             "return ' '.join(s.split()[::-1])", lambda r: (_text(r),)),
    Template("count_vowels", "s", "the number of vowels (a, e, i, o, u, in either case) in s",
             "return sum(1 for c in s.lower() if c in 'aeiou')", lambda r: (_text(r),)),
    Template("is_palindrome", "s", "True if s reads the same backwards as forwards, else False",
             "return s == s[::-1]", lambda r: (_maybe_palindrome(r),)),
    Template("running_sum", "xs", "the running sums of xs: a list whose element i is xs[0] + ... + xs[i]",
             "out, total = [], 0\n    for x in xs:\n        total += x\n        out.append(total)\n    return out",
             lambda r: (_ints(r),)),
    Template("second_largest", "xs", "the second largest distinct number in xs, or None if there is none",
             "values = sorted(set(xs))\n    return values[-2] if len(values) > 1 else None",
             lambda r: (_ints(r, 0, 6),)),
    Template("digit_sum", "n", "the sum of the decimal digits of the non-negative integer n",
             "return sum(int(d) for d in str(n))", lambda r: (r.randint(0, 10**6),)),
    Template("power_sum", "n", "1**{p} + 2**{p} + ... + n**{p} (0 for n = 0)",
             "total = 0\n    for i in range(1, n + 1):\n        total += i ** {p}\n    return total",
             lambda r: (r.randint(0, 30),), lambda r: {"p": r.randint(1, 4)}),
    Template("multiples_up_to", "n", "the numbers from 1 to n inclusive that are divisible by {a} or by {b}, "
             "in increasing order", "return [i for i in range(1, n + 1) if i % {a} == 0 or i % {b} == 0]",
             lambda r: (r.randint(0, 30),), lambda r: {"a": r.randint(2, 5), "b": r.randint(6, 9)}),
    Template("caesar", "s", "s with each lowercase letter moved {k} places forward in the alphabet (wrapping "
             "from z round to a) and every other character unchanged",
             "return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)",
             lambda r: (_text(r),), lambda r: {"k": r.randint(1, 25)}),
    Template("unique", "xs", "the numbers of xs without repeats, each kept where it first appears",
             "return list(dict.fromkeys(xs))", lambda r: (_ints(r, 0, 5),)),
    Template("longest_word", "s", "the longest word of s (words are separated by spaces; the first of equally "
             "long ones; '' when there is none)", "return max(s.split(), key=len, default='')",
             lambda r: (_text(r),)),
    Template("pair_count", "xs", "the number of index pairs i < j with xs[i] + xs[j] == {t}",
             "return sum(1 for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[i] + xs[j] == {t})",
             lambda r: (_ints(r, 0, 10),), lambda r: {"t": r.randint(5, 15)}),
    Template("clamp", "xs", "xs with each number below {low} replaced by {low} and each above {high} by {high}",
             "return [min(max(x, {low}), {high}) for x in xs]", lambda r: (_ints(r),),
             lambda r: {"low": r.randint(-10, 0), "high": r.randint(1, 10)}),
    Template("gcd", "a, b", "the greatest common divisor of the positive integers a and b",
             "while b:\n        a, b = b, a % b\n    return a", lambda r: (r.randint(1, 100), r.randint(1, 100))),
    Template("is_prime", "n", "True if n is a prime number, else False",
             "return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))", lambda r: (r.randint(0, 200),)),
    Template("every_kth", "xs", "the elements of xs whose index is a multiple of {k}, in order",
             "return xs[::{k}]", lambda r: (_ints(r),), lambda r: {"k": r.randint(2, 4)}),
    Template("count_words", "s", "the number of words in s (words are separated by whitespace)",
             "return len(s.split())", lambda r: (_text(r),)),
    Template("product_odd", "xs", "the product of the odd numbers in xs (1 when there are none)",
             "out = 1\n    for x in xs:\n        if x % 2:\n            out *= x\n    return out",
             lambda r: (_ints(r, -9, 9, 6),)),
    Template("to_binary", "n", "the binary digits of the non-negative integer n as a string, without '0b'",
             "return bin(n)[2:]", lambda r: (r.randint(0, 1000),)),
    Template("count_letter", "s", "how many times the letter '{c}' occurs in s",
             "return s.count('{c}')", lambda r: (_text(r),), lambda r: {"c": r.choice("aeiklnorst")}),
)
TESTS_PER_PROBLEM = 5
DRAWS_PER_PROBLEM = 20  # random inputs drawn to choose the tests from
FUNCTION_PROMPT = "Write a Python function `{name}({args})` that returns {returns}. For example, `{call}` " \
                  "returns `{value}`. Give the function in a ```python code block."


@functools.lru_cache(maxsize=1024)
def _reference(source: str, name: str) -> Callable[..., Any]:
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # r1kit's own template source, never a model's
    return namespace[name]


def function_problem(rng: random.Random) -> Row:
    """One problem: a template and its parameters, the reference solution and assert tests from random inputs
    (one shown as the prompt's example); the expected values come from running the reference."""
    template = rng.choice(TEMPLATES)
    params = template.params(rng)
    source = f"def {template.name}({template.args}):\n    {template.body.format(**params)}\n"
    reference = _reference(source, template.name)
    drawn: dict[str, Any] = {}
    for _ in range(DRAWS_PER_PROBLEM):
        args = template.draw(rng)
        drawn.setdefault(f"{template.name}({', '.join(map(repr, args))})", reference(*copy.deepcopy(args)))
    # a case of each distinct result first: tests that all expect False (say) would pass a constant function
    first_of_value: dict[str, str] = {}
    for call, value in drawn.items():
        first_of_value.setdefault(repr(value), call)
    calls = list(dict.fromkeys([*first_of_value.values(), *drawn]))[:TESTS_PER_PROBLEM]
    cases = {call: drawn[call] for call in calls}
    call = max(cases, key=len)  # the longest call makes the most telling example
    value = cases[call]
    prompt = FUNCTION_PROMPT.format(name=template.name, args=template.args, returns=template.returns.format(**params),
                                    call=call, value=repr(value))
    return {"prompt": prompt, "answer": source, "function": template.name,
            "tests": [f"assert {c} == {v!r}" for c, v in cases.items()]}


def functions(n: int = 1000, seed: int = 0, partial: bool = False, timeout_s: float = 5.0,
              unsafe_no_sandbox: bool = False) -> CodeTask:
    """`n` generated function-synthesis problems with assert tests (25 templates); row i from Random(seed + i)."""
    if n < 1:
        raise ValueError("functions needs n >= 1")
    rows = [{"id": i, **function_problem(random.Random(seed + i))} for i in range(n)]
    return code_task("functions", rows, Scoring(partial, timeout_s, unsafe_no_sandbox),
                     {"seed": seed, "templates": len(TEMPLATES)})
