"""The types generation speaks: SamplingParams in, Completions out, through a Generator."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: n completions per prompt, temperature 0 meaning greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 256
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int = 0
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_tokens < 1:
            raise ValueError("n and max_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p < 1:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0 and 0 <= min_p < 1")
        if self.repetition_penalty <= 0 or self.top_logprobs < 0:
            raise ValueError("need repetition_penalty > 0 and top_logprobs >= 0")

    @property
    def filtered(self) -> bool:
        """Whether it keeps fewer than all tokens (top-k, top-p or min-p)."""
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    @property
    def penalized(self) -> bool:
        """Whether it has a repetition penalty (then the sampler needs the token history)."""
        return self.repetition_penalty != 1

    def to_dict(self) -> dict:
        """Every setting, for results files."""
        return asdict(self)


@dataclass
class Completion:
    """One sampled continuation: its text, token ids, the logprob of each token and why it ended.

    `logprobs[i]` is log p(token_ids[i]) under softmax(logits / temperature), untruncated by
    top-p/top-k and without repetition penalty: the quantity GRPO's importance ratio needs.
    `top_logprobs[i]`, when asked for, maps the most likely tokens at position i to their logprobs.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    prompt_index: int = 0
    top_logprobs: list[dict[int, float]] | None = None


Progress = Callable[[int], None]


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str | None:
    """text up to the earliest stop string in it, or None when none occurs."""
    hits = [text.index(s) for s in stop if s in text]
    return text[: min(hits)] if hits else None


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids; no second BOS when the (chat-templated) text already starts with one."""
    return encode_prompts(tokenizer, [prompt])[0]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """encode_prompt of each prompt, in one tokenizer call per BOS case (a fast tokenizer encodes a batch
    in parallel: 512 prompts one by one took 70 ms of a 0.9-s rollout)."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and p.startswith(bos) for p in prompts]
    ids: list[list[int]] = [[] for _ in prompts]
    for flag in (False, True):
        where = [i for i, b in enumerate(has_bos) if b == flag]
        if where:
            for i, row in zip(where, tokenizer([prompts[i] for i in where], add_special_tokens=not flag)["input_ids"],
                              strict=True):
                ids[i] = row
    return ids


Round = tuple[list[str], SamplingParams]  # one generate() call's prompts and settings


class Generator(Protocol):
    """Anything that turns prompts into completions: HF generate or the rollout engine."""

    def generate(self, prompts: list[str], params: SamplingParams, progress: Progress | None = None
                 ) -> list[Completion]:
        """n completions per prompt, grouped by prompt in prompt order; progress(k) after k more finish."""
        ...

    def generate_rounds(self, rounds: Iterable[Round], progress: Progress | None = None
                        ) -> Iterator[list[Completion]]:
        """generate() of each round in turn (a generator may start the next before it yields this one)."""
        ...


class RoundByRound:
    """generate_rounds for a generator (or a sample teacher) that has no queue to start the next round in while
    this one runs: a round is generate()'s arguments before `progress`."""

    def generate_rounds(self, rounds: Iterable[tuple], progress: Progress | None = None
                        ) -> Iterator[list[Completion]]:
        """generate(*round) of each round in turn."""
        for args in rounds:
            yield self.generate(*args, progress=progress)
