"""The GRPO objective as one pure function of tensors."""

from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
MAX_LOG_RATIO = 20.0  # importance ratios are kept within e^-20 .. e^20


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
    normalizer: float | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped importance-ratio loss with separate low/high clip (DAPO) and beta-weighted k3 KL.

    Token tensors are (batch, length); advantages (batch,). Aggregation: `grpo` averages tokens
    within each sequence, then sequences; `bnpo`/`dapo` average all unmasked tokens of the batch;
    `dr_grpo` sums tokens and divides by batch x max_completion_length. `normalizer` replaces the
    denominator (sequences, tokens, or batch x length) so that micro-batches of one batch add up to
    the loss of the whole batch. `entropy` (per token), if given, is only averaged into the metrics.
    """
    mask = mask.to(logp.dtype)
    # exp overflows to inf past a log-ratio of ~88; then the branch torch.min does not pick still sends
    # 0 * inf = NaN into the gradient, even where the clipped term is chosen and the loss stays finite.
    # Far past the clip range every ratio is clipped (or, for a negative advantage, an outlier token), so
    # bounding the log-ratio changes nothing else.
    ratio = torch.exp((logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, loss_type, max_completion_length, normalizer)

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        low = (ratio < 1 - clip_low) & (adv < 0)
        high = (ratio > 1 + clip_high) & (adv > 0)
        metrics = {
            "clip_fraction": ((low | high).to(mask.dtype) * mask).sum().item() / tokens.item(),
            "clip_low_fraction": (low.to(mask.dtype) * mask).sum().item() / tokens.item(),
            "clip_high_fraction": (high.to(mask.dtype) * mask).sum().item() / tokens.item(),
            "ratio_mean": (ratio * mask).sum().item() / tokens.item(),
        }
        if kl is not None:
            metrics["kl"] = (kl * mask).sum().item() / tokens.item()
        if entropy is not None:
            metrics["entropy"] = (entropy * mask).sum().item() / tokens.item()
    return loss, metrics


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType,
              max_completion_length: int | None = None, normalizer: float | None = None) -> torch.Tensor:
    """Reduce a (batch, length) per-token loss to a scalar the way loss_type says."""
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_sequence.sum() / (normalizer or per_token.shape[0])
    if loss_type in ("bnpo", "dapo"):
        return (per_token * mask).sum() / (normalizer or mask.sum().clamp(min=1))
    if loss_type == "dr_grpo":
        length = max_completion_length or per_token.shape[1]
        return (per_token * mask).sum() / (normalizer or per_token.shape[0] * length)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose grpo, bnpo, dapo or dr_grpo")
