"""Answer extraction and mathematical equality, both decided by math-verify.

A completion is read as lighteval and open-r1 read it: math-verify's `parse` over the whole text with
LaTeX and plain-expression extraction, `\\boxed{}` first, then "final answer is", "answer:", then the last
LaTeX or number. r1kit adds two rules, each because math-verify alone misses what it catches:
- without a `\\boxed{}`, an R1-Zero `<answer>` block is the answer, read whole as LaTeX even when the model
  wrote no `$` (math-verify finds no `\\sqrt{2}` or `x^2+1` outside `$...$` and takes a stray number instead);
- a bare gold answer, as MATH writes them (`\\sqrt{66}`, `[0,1)`, `-2,1`), is read as LaTeX: read as text,
  108 of MATH-500's 500 gold answers do not grade their own `\\boxed{}` correct.
Tasks with their own answer format (addition's strict `Answer:`, countdown's equation) verify by their own rules.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# Boxed first, as open-r1's accuracy reward and math-verify's own tests configure it.
_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_MATH_DELIMITERS = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
_LATEX_COMMAND = re.compile(r"\\(?:begin|end)\{[^{}]*\}|\\[a-zA-Z]+")
_PROSE_WORD = re.compile(r"[a-zA-Z]{2,}")
_THOUSANDS_NUMBER = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_COMMA = re.compile(r"-?\d+,\d+")

Parsed = tuple[Any, ...]  # math-verify's reading: sympy values, then the extracted string


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`) in text, braces balanced."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    if start >= len(text):
        return None
    if text[start] != "{":
        token = re.match(r"[^\s$]+", text[start:])
        return token.group(0) if token else None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i].strip()
    return None


def answer_block(text: str) -> str | None:
    """The content of the last non-empty `<answer>` block (an unclosed one runs to the end), if any."""
    blocks = [b.strip() for b in _ANSWER_BLOCK.findall(text)]
    blocks = [b for b in blocks if b]
    return blocks[-1] if blocks else None


def _timeout() -> int | None:
    # math-verify times out with SIGALRM, which exists only in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _mv_parse(text: str) -> Parsed:
    return tuple(parse(text, _CONFIG, parsing_timeout=_timeout()))


def _is_prose(answer: str) -> bool:
    """Whether an answer has words besides LaTeX commands ("12 apples", "The answer is 5")."""
    return _PROSE_WORD.search(_LATEX_COMMAND.sub("", answer)) is not None


@lru_cache(maxsize=4096)
def parse_answer(answer: str) -> Parsed:
    """math-verify's reading of a lone answer (a gold answer, an `<answer>` block, an extracted answer).

    Bare LaTeX, as MATH writes its answers (`\\frac{1}{2}`, `[0,1)`, `-2,1`), is read as if in `$...$`;
    text with `$`, `\\(`, `\\[` or `\\boxed` and prose are read as math-verify reads a completion.
    """
    answer = answer.strip()
    if _MATH_DELIMITERS.search(answer) or _THOUSANDS_NUMBER.fullmatch(answer):
        return _mv_parse(answer)  # in `$...$`, "58,500" would be a list of two
    wrapped = f"${answer}$"
    if _DECIMAL_COMMA.fullmatch(answer):
        # "1,22": a decimal comma to math-verify, two solutions in MATH ("-2,1"); either reading counts.
        return _mv_parse(wrapped) + _mv_parse(answer)
    if _is_prose(answer):
        return _mv_parse(answer) or _mv_parse(wrapped)
    return _mv_parse(wrapped) or _mv_parse(answer)


@lru_cache(maxsize=1024)
def parse_completion(completion: str) -> Parsed:
    """math-verify's reading of a completion's final answer; cached, so extract and verify parse once."""
    if "\\boxed" not in completion:
        block = answer_block(completion)
        if block is not None:
            return parse_answer(block)
    return _mv_parse(completion)


def _extracted_string(parsed: Parsed) -> str | None:
    strings = [p.strip() for p in parsed if isinstance(p, str) and p.strip()]
    return strings[0] if strings else None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion as math-verify extracts it (`\\boxed{}` first), else its `<answer>` block."""
    return _extracted_string(parse_completion(text)) or answer_block(text)


def _verify(gold: Parsed, pred: Parsed) -> bool:
    if not (gold and pred):
        return False
    try:
        hash((gold, pred))
    except TypeError:  # a matrix: sympy's mutable Matrix has no hash
        return _mv_verify(gold, pred)
    return _cached_verify(gold, pred)


def _mv_verify(gold: Parsed, pred: Parsed) -> bool:
    return bool(verify(list(gold), list(pred), timeout_seconds=_timeout()))


# The G completions of a group mostly share a few answers, and sympy's comparison is the slow part.
_cached_verify = lru_cache(maxsize=4096)(_mv_verify)


def is_equiv(pred: str | None, gold: str | None) -> bool:
    """Whether two final answers (gold answers, extracted answers) are equal, as math-verify decides."""
    if pred is None or gold is None or not pred.strip() or not gold.strip():
        return False
    if pred.strip() == gold.strip():
        return True
    return _verify(parse_answer(gold), parse_answer(pred))


def score_answer(completion: str, gold: str) -> float:
    """1.0 when the completion's final answer (math-verify's reading) equals gold, else 0.0."""
    return float(_verify(parse_answer(gold), parse_completion(completion)))
