"""Answer extraction and mathematical equality, decided by math-verify."""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from math_verify import parse, verify

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit)\{([^{}]*)\}")


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


def last_number(text: str) -> str | None:
    """The last number written in text (signs, decimals and thousands separators kept)."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def is_numeric(text: str) -> bool:
    """Whether text is a plain number such as `-1,234.5`."""
    return _NUMBER.fullmatch(text.strip().replace("$", "")) is not None


def extract_answer(text: str, gold: str | None = None) -> str | None:
    """The final answer of a completion: last \\boxed{}, else the <answer> block, else the last number.

    The last-number fallback applies only when the gold answer is numeric (or unknown), since a
    stray number is no answer to a question whose answer is a set or an expression.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks and blocks[-1].strip():
        inner = blocks[-1].strip()
        return last_boxed(inner) or inner
    if gold is None or is_numeric(gold):
        return last_number(text)
    return None


def _normalize(answer: str) -> str:
    answer = answer.strip().strip("$").strip()
    answer = answer.rstrip(".").strip()
    return _THOUSANDS.sub("", answer)


def _plain_text(answer: str) -> str:
    answer = _TEXT_WRAPPERS.sub(r"\1", answer)
    return re.sub(r"[\s{}()\\]", "", answer).lower()


def _timeout() -> int | None:
    # math-verify times out with SIGALRM, which exists only in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _parsed(answer: str) -> tuple:
    return tuple(parse(f"${answer}$", parsing_timeout=_timeout()))


def is_equiv(pred: str | None, gold: str | None) -> bool:
    """Whether two final answers are mathematically equal (math-verify), with a plain-text fallback."""
    if pred is None or gold is None:
        return False
    pred, gold = _normalize(pred), _normalize(gold)
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    gold_parsed, pred_parsed = _parsed(gold), _parsed(pred)
    if gold_parsed and pred_parsed and verify(list(gold_parsed), list(pred_parsed), timeout_seconds=_timeout()):
        return True
    # Text answers ("Monday", "(C)") that sympy cannot compare; never numbers, tuples or intervals.
    text = _plain_text(gold)
    return text.isalpha() and _plain_text(pred) == text


def score_answer(completion: str, gold: str) -> float:
    """1.0 when the completion's final answer equals gold, else 0.0."""
    return float(is_equiv(extract_answer(completion, gold), gold))
