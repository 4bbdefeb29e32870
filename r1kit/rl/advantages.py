"""Group-relative advantages: each completion's reward against the other completions of its prompt."""

from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["group", "batch", "none"]
EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Scale = "group",
                     batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """Reward minus its group's mean, divided by the group's std + 1e-4 (`group`), the batch's std
    + 1e-4 (`batch`; `batch_std` when the batch spans several processes) or nothing (`none`, Dr. GRPO).
    Groups are consecutive runs of group_size."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
        centered = centered / (std + EPS)
    elif scale == "batch":
        if batch_std is None:
            batch_std = rewards.std() if rewards.numel() > 1 else 0.0
        centered = centered / (batch_std + EPS)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r}; choose group, batch or none")
    return centered.reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A bool per group: whether its rewards differ (a group of equal rewards teaches nothing)."""
    groups = rewards.view(-1, group_size)
    return (groups.max(dim=1).values - groups.min(dim=1).values) > 0
