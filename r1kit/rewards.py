"""Rule-based rewards with TRL's signature: `fn(completions: list[str], **columns) -> list[float]`.

Completions may be plain strings or, as TRL passes them for conversational data, lists of
messages; each function reads the text of the last message. Columns are the task rows' fields
(`answer`, `prompts`, ...), one list entry per completion.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from r1kit.grading import score_answer
from r1kit.prompts import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, split_trace
from r1kit.sandbox import check_sandbox
from r1kit.tasks.base import completion_text
from r1kit.tasks.code import CODE_FIELDS, Scoring, last_code_block, score_programs
from r1kit.tasks.countdown import equation_credit
from r1kit.tasks.datasets import import_function

RewardFn = Callable[..., list[float]]

_FORMAT = re.compile(r"^\s*<think>(?P<reasoning>.*?\S.*?)</think>(?P<answer>.*)$", re.DOTALL)
_WORD = re.compile(r"\w+")


def accuracy_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 when the final answer (math-verify's, \\boxed{} first, else the <answer> block) equals `answer`."""
    return [score_answer(completion_text(c), str(gold)) for c, gold in zip(completions, answer, strict=True)]


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 when the reasoning is inside <think>...</think> and a non-empty answer follows."""
    scores = []
    for c in completions:
        match = _FORMAT.match(completion_text(c))
        ok = bool(match) and THINK_OPEN not in match["answer"] and THINK_CLOSE not in match["answer"]
        if ok and ANSWER_OPEN in match["answer"]:
            ok = ANSWER_CLOSE in match["answer"]
        ok = ok and bool(split_trace(completion_text(c))[1])
        scores.append(1.0 if ok else 0.0)
    return scores


def tag_count_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Partial credit, 0.25 a piece: <think> once, </think> once, an answer block (or \\boxed) after it."""
    scores = []
    for c in completions:
        text = completion_text(c)
        score = 0.25 * (text.count(THINK_OPEN) == 1) + 0.25 * (text.count(THINK_CLOSE) == 1)
        after = text.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in text else ""
        if ANSWER_OPEN in after or ANSWER_CLOSE in after:
            score += 0.25 * (after.count(ANSWER_OPEN) == 1) + 0.25 * (after.count(ANSWER_CLOSE) == 1)
        elif "\\boxed" in after:
            score += 0.5
        scores.append(score)
    return scores


def marker_reward(completions: Sequence[Any], marker: str = "Answer:", **kwargs: Any) -> list[float]:
    """1.0 when a number follows the last `marker` (partial credit for the answer format a task asks for)."""
    pattern = re.compile(re.escape(marker) + r"\s*\$?-?\d")
    texts = [completion_text(c) for c in completions]
    return [1.0 if pattern.search(text[text.rfind(marker):]) else 0.0 for text in texts]


def equation_reward(completions: Sequence[Any], numbers: Sequence[list[int]], **kwargs: Any) -> list[float]:
    """Countdown's partial credit: 0.5 for an <answer> block, 1.0 when it holds an equation of the row's
    numbers (each at most once), right or wrong."""
    return [equation_credit(completion_text(c), list(n)) for c, n in zip(completions, numbers, strict=True)]


def code_reward(completions: Sequence[Any], partial: bool = False, timeout_s: float = 5.0,
                unsafe_no_sandbox: bool = False, **columns: Any) -> list[float]:
    """1.0 when the last fenced Python block passes the row's tests in the sandbox (`partial`: the share passed).

    Columns: `tests` (assert strings), or `inputs` and `outputs` (stdin/stdout cases), or HumanEval's `test` and
    `entry_point` (with `code_prompt`, the code the candidate follows). The batch runs in one parallel pool.
    """
    rows = [{name: columns[name][i] for name in CODE_FIELDS if name in columns} for i in range(len(completions))]
    programs = [last_code_block(completion_text(c)) for c in completions]
    return score_programs(programs, rows, Scoring(partial, timeout_s, unsafe_no_sandbox))


def script_of(word: str) -> str:
    """The Unicode script of a word's first letter (LATIN, CJK, CYRILLIC, ...), or DIGIT."""
    ch = word[0]
    if ch.isdigit() or ch == "_":
        return "DIGIT"
    name = unicodedata.name(ch, "UNKNOWN")
    for script in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL"):
        if script in name:
            return "CJK"
    return name.split(" ")[0]


def _words_by_script(text: str) -> list[str]:
    return [s for s in map(script_of, _WORD.findall(text)) if s != "DIGIT"]


def language_consistency_reward(
    completions: Sequence[Any], prompts: Sequence[Any] | None = None, **kwargs: Any
) -> list[float]:
    """Share of the reasoning's words written in the prompt's script, as in the R1 paper (1.0 if no words)."""
    prompts = prompts if prompts is not None else kwargs.get("prompt")
    if prompts is None:
        raise ValueError("language_consistency_reward needs the prompts (column 'prompts' or 'prompt')")
    scores = []
    for c, p in zip(completions, prompts, strict=True):
        prompt_scripts = _words_by_script(completion_text(p))
        target = max(set(prompt_scripts), key=prompt_scripts.count) if prompt_scripts else "LATIN"
        reasoning = split_trace(completion_text(c))[0] or completion_text(c)
        words = _words_by_script(reasoning)
        scores.append(sum(w == target for w in words) / len(words) if words else 1.0)
    return scores


def soft_overlong_penalty(
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    *,
    max_tokens: int,
    buffer_tokens: int,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to max-buffer tokens, falling linearly to -1 at max_tokens.

    Lengths are token counts when `completion_ids` is given (as TRL passes it), else characters / 4.
    """
    if completion_ids is None:
        lengths = [len(completion_text(c)) / 4 for c in completions]
    else:
        lengths = [len(ids) for ids in completion_ids]
    start = max_tokens - buffer_tokens
    return [max(-1.0, min(0.0, (start - n) / max(buffer_tokens, 1))) for n in lengths]


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "marker": marker_reward,
    "equation": equation_reward,
    "code": code_reward,
    "language": language_consistency_reward,
    "length": soft_overlong_penalty,
}


def make_reward(name: str, **options: Any) -> RewardFn:
    """A built-in reward by name, its options bound (e.g. `length` with max_tokens, buffer_tokens)."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; built-in rewards: {', '.join(REWARDS)}")
    fn = REWARDS[name]
    if fn is code_reward and not options.get("unsafe_no_sandbox"):
        check_sandbox()  # a refused sandbox stops the run here, not as a reward failure on every sample
    return partial(fn, **options) if options else fn


def reward_columns(rows: list[dict[str, Any]], prompts: list[Any]) -> dict[str, list[Any]]:
    """TRL-style columns for one completion per (row, prompt): every row field, `prompts` and `row`."""
    keys = dict.fromkeys(k for row in rows for k in row if not k.startswith("_"))
    columns = {k: [row.get(k) for row in rows] for k in keys}
    return {**columns, "prompts": list(prompts), "row": list(rows)}


def import_reward(spec: str) -> RewardFn:
    """A TRL-style reward function named `module:function` (or `path/to/file.py:function`)."""
    return import_function(spec, "reward")


def build_rewards(weights: dict[str, float | dict[str, Any]], accuracy: RewardFn | None = None
                  ) -> dict[str, tuple[RewardFn, float]]:
    """Reward functions with weights from config: `{accuracy: 1.0, length: {weight: 0.5, max_tokens: 256}}`.

    Names are built-ins, or `module:function` for your own TRL-style function; `accuracy` is the
    task's verifier when one is given.
    """
    built = {}
    for name, setting in weights.items():
        options = dict(setting) if isinstance(setting, dict) else {"weight": setting}
        weight = float(options.pop("weight", 1.0))
        if name == "accuracy" and accuracy is not None and not options:
            fn = accuracy
        elif ":" in name:
            fn = import_reward(name)
        else:
            fn = make_reward(name, **options)
        built[name] = (fn, weight)
    return built


@dataclass
class RewardScores:
    """Rewards of one batch: the weighted total and each function's own scores."""

    total: list[float]
    per_reward: dict[str, list[float]]
    failures: dict[str, int] = field(default_factory=dict)


def _call_isolated(fn: RewardFn, completions: list[Any], columns: dict[str, list[Any]]
                   ) -> tuple[list[float], int, Exception | None]:
    """Scores of fn, a sample whose call raises (or returns None) scoring 0.0; also the failure count and the
    first failing sample's exception."""
    try:
        return [0.0 if s is None else float(s) for s in fn(completions, **columns)], 0, None
    except Exception:  # noqa: BLE001 - a user's reward function may raise anything
        pass
    scores, failures, first = [], 0, None
    for i, c in enumerate(completions):
        try:
            (s,) = fn([c], **{k: [v[i]] for k, v in columns.items()})
            scores.append(0.0 if s is None else float(s))
        except Exception as error:  # noqa: BLE001
            scores.append(0.0)
            failures += 1
            first = error if first is None else first
    return scores, failures, first


def _describe(error: Exception) -> str:
    """An exception's type and the first line of its message, at most 200 characters of it."""
    lines = str(error).splitlines()
    return type(error).__name__ + (f": {lines[0][:200]}" if lines and lines[0] else "")


def score_completions(
    rewards: dict[str, tuple[RewardFn, float]], completions: list[Any], columns: dict[str, list[Any]]
) -> RewardScores:
    """Weighted sum of reward functions; a function that raises scores 0.0 for that sample and warns, naming
    the first exception."""
    per_reward, failures = {}, {}
    total = [0.0] * len(completions)
    for name, (fn, weight) in rewards.items():
        scores, failed, error = _call_isolated(fn, completions, columns)
        if len(scores) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(scores)} scores for {len(completions)} completions")
        if failed:
            failures[name] = failed
            warnings.warn(f"reward {name!r} raised on {failed} of {len(completions)} samples (first: "
                          f"{_describe(error)}); scored 0.0", RuntimeWarning, stacklevel=2)
        per_reward[name] = scores
        total = [t + weight * s for t, s in zip(total, scores, strict=True)]
    return RewardScores(total=total, per_reward=per_reward, failures=failures)
