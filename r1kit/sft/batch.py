"""Micro-batches of SFT examples: packed without padding, or padded in length buckets.

Packed: the examples of a micro-batch are concatenated into one row, position ids restarting at 0 for
each. With no attention mask, transformers reads the restarts as sample boundaries and attends only
within a sample (a block-diagonal causal mask), so a sample computes exactly what it would alone.
Targets are shifted inside each sample, never across a boundary.
"""

from __future__ import annotations

import torch

from r1kit.sft.data import Example

IGNORE = -100


def plan_micro_batches(examples: list[Example], max_tokens: int, packed: bool) -> list[list[Example]]:
    """Split a step's examples into micro-batches of at most max_tokens tokens (padded tokens when not packed).

    Longest first, each into the first micro-batch it fits (first-fit decreasing); unpacked batches take
    examples of similar length together, so padding stays small.
    """
    bins: list[list[Example]] = []
    used: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        for i, members in enumerate(bins):
            size = used[i] + len(ex) if packed else (len(members) + 1) * len(members[0])
            if size <= max_tokens:
                members.append(ex)
                used[i] += len(ex)
                break
        else:
            bins.append([ex])
            used.append(len(ex))
    return bins


def shifted_targets(ex: Example) -> list[int]:
    """For each position, the next token when it is trained on, else IGNORE; the last position predicts nothing."""
    return [nxt if train else IGNORE for nxt, train in zip(ex.input_ids[1:], ex.trainable[1:], strict=True)] + [IGNORE]


def collate(examples: list[Example], packed: bool, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs and targets for one micro-batch: one packed row, or right-padded rows with a mask."""
    if packed:
        ids = [t for ex in examples for t in ex.input_ids]
        positions = [p for ex in examples for p in range(len(ex))]
        targets = [t for ex in examples for t in shifted_targets(ex)]
        batch = {"input_ids": [ids], "position_ids": [positions], "targets": [targets]}
    else:
        width = max(map(len, examples))
        batch = {"input_ids": [], "position_ids": [], "targets": [], "attention_mask": []}
        for ex in examples:
            pad = width - len(ex)
            batch["input_ids"].append(ex.input_ids + [pad_id] * pad)
            batch["position_ids"].append(list(range(len(ex))) + [0] * pad)
            batch["targets"].append(shifted_targets(ex) + [IGNORE] * pad)
            batch["attention_mask"].append([1] * len(ex) + [0] * pad)
    return {k: torch.tensor(v, device=device) for k, v in batch.items()}


def token_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed negative log-likelihood of the batch's target tokens.

    Only positions with a target go through the output head (`logits_to_keep` with their indices), so
    prompt tokens cost no vocabulary-sized matmul; the log-softmax is r1kit's chunked one.
    """
    from r1kit.rl.logprobs import target_logprobs

    targets = batch["targets"]
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    keep = torch.unique(cols)
    # no cache: with one, transformers would not read the position restarts as sample boundaries
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch.get("attention_mask"), logits_to_keep=keep, use_cache=False)
    # the kept columns, in order: map each target's column to its index among them
    index = torch.searchsorted(keep, cols)
    logits = out.logits[rows, index]
    logp, _ = target_logprobs(logits[None], targets[rows, cols][None])
    return -logp.sum()
