"""Log-probabilities of the sampled tokens without keeping a float32 log-softmax over the vocabulary.

The plain way, `(logits.float() / T).log_softmax(-1).gather(...)`, materialises and saves for backward a
float32 tensor of (sequences x tokens x vocabulary): 3.2 GB for 64 completions of 256 tokens at SmolLM2's
49k vocabulary, several times over counting its temporaries and the entropy. Here the forward keeps only
the logits it was given (bf16 under autocast) and one log-normaliser per token, and both passes walk the
rows in chunks of bounded size, so the float32 working set stays near `CHUNK_ELEMENTS`.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**26  # float32 elements per chunk: 256 MB


def _chunks(logits: torch.Tensor):
    """(sequences, tokens) index pairs of (batch, tokens, vocab) logits whose float32 copies hold at most
    about CHUNK_ELEMENTS elements: whole sequences where they fit, a long sequence in pieces."""
    batch, tokens, vocab = logits.shape
    if tokens * vocab <= CHUNK_ELEMENTS:
        rows = CHUNK_ELEMENTS // max(1, tokens * vocab)
        yield from ((slice(b, b + rows), slice(None)) for b in range(0, batch, rows))
        return
    span = max(1, CHUNK_ELEMENTS // vocab)
    yield from ((slice(b, b + 1), slice(t, t + span)) for b in range(batch) for t in range(0, tokens, span))


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature: float, with_entropy: bool):
        lse = torch.empty(targets.shape, device=logits.device, dtype=torch.float32)
        entropy = torch.empty_like(lse) if with_entropy else None
        for part in _chunks(logits):
            scaled = logits[part].float() / temperature
            lse[part] = torch.logsumexp(scaled, -1)
            if with_entropy:
                probs = (scaled - lse[part][..., None]).exp_()
                entropy[part] = lse[part] - (probs * scaled).sum(-1)
        picked = logits.gather(-1, targets[..., None]).squeeze(-1).float() / temperature - lse
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        if entropy is None:
            return picked, None
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked, _grad_entropy):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for part in _chunks(logits):
            # d picked / d logits = (onehot(target) - softmax(logits / T)) / T
            g = grad_picked[part][..., None].float()
            chunk = (logits[part].float() / ctx.temperature - lse[part][..., None]).exp_().mul_(-g)
            chunk.scatter_add_(-1, targets[part][..., None], g)
            grad[part] = chunk.div_(ctx.temperature)
        return grad, None, None, None


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature) at `targets` (float32, differentiable), and optionally the entropy
    of each position's distribution (float32, no gradient). logits: (batch, tokens, vocab); targets:
    (batch, tokens)."""
    return _TargetLogprobs.apply(logits, targets, temperature, with_entropy)
