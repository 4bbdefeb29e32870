"""Token sampling on the device: temperature, top-k, top-p, min-p, and the sampled token's logprob."""

from __future__ import annotations

import torch

from r1kit.rollout.types import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Logits with tokens outside the top-k / nucleus / min-p set to -inf (the top token always kept)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logprobs) for a (batch, vocab) float32 logit matrix; logprobs from softmax(logits / T)."""
    if params.temperature == 0:
        logprobs = logits.log_softmax(-1)
        tokens = logits.argmax(-1)
    else:
        scaled = logits / params.temperature
        logprobs = scaled.log_softmax(-1)
        probs = filter_logits(scaled, params.top_k, params.top_p, params.min_p).softmax(-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
