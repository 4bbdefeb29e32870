"""Rejection sampling's judgement of one prompt's traces: verified, then each filter, then de-duplicated."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from r1kit.config import FilterConfig
from r1kit.rewards import format_reward, language_consistency_reward

REASONS = ("unverified", "format", "language", "length", "repetition", "duplicate", "over_limit")


@dataclass
class Candidate:
    """One trace of a prompt with what the judgement needs: its verifier score and its length in tokens."""

    text: str
    reward: float
    tokens: int
    finish_reason: str


def repetition_loop(text: str, ngram: int, times: int) -> bool:
    """Whether some run of `ngram` words occurs `times` or more (a model stuck repeating itself)."""
    words = text.split()
    counts = Counter(tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1))
    return bool(counts) and max(counts.values()) >= times


def normalized(text: str) -> str:
    """Text compared for de-duplication: whitespace collapsed, lower case."""
    return re.sub(r"\s+", " ", text).strip().lower()


def rejection(c: Candidate, prompt: str, cfg: FilterConfig, min_reward: float, max_tokens: int) -> str | None:
    """Why a single trace is rejected (one of REASONS), or None when it passes."""
    if c.reward < min_reward:
        return "unverified"
    if cfg.require_format and not format_reward([c.text])[0]:
        return "format"
    if language_consistency_reward([c.text], [prompt])[0] < cfg.min_language:
        return "language"
    if c.finish_reason == "length" or c.tokens > max_tokens:
        return "length"
    if repetition_loop(c.text, cfg.repeat_ngram, cfg.repeat_times):
        return "repetition"
    return None


def judge(candidates: list[Candidate], prompt: str, cfg: FilterConfig, min_reward: float,
          max_tokens: int) -> list[str | None]:
    """For each of a prompt's traces, in order, why it is rejected, or None for the ones kept."""
    seen: set[str] = set()
    verdicts: list[str | None] = []
    kept = 0
    for c in candidates:
        reason = rejection(c, prompt, cfg, min_reward, max_tokens)
        if reason is None and cfg.dedup:
            key = normalized(c.text)
            reason = "duplicate" if key in seen else None
            seen.add(key)
        if reason is None and cfg.keep_per_prompt is not None and kept >= cfg.keep_per_prompt:
            reason = "over_limit"
        kept += reason is None
        verdicts.append(reason)
    return verdicts
