"""A sequence being generated: its tokens, logprobs, KV blocks and why it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field

from r1kit.rollout.types import FinishReason, SamplingParams


@dataclass
class Sequence:
    """One completion in flight. `index` is its place in the request (0..n-1); `key` seeds its sampling."""

    request_id: int
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    key: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    text: str = ""

    @property
    def length(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        """Prompt and generated tokens (what the repetition penalty looks at)."""
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
