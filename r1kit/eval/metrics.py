"""Metrics over k samples per problem: unbiased pass@k, majority-vote cons@k, length statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021: 1 - C(n-c, k) / C(n, k), for c correct of n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_clusters(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> list[list[int]]:
    """Indices of the answers grouped into classes of equal answers (None abstains), in first-seen order."""
    clusters: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for cluster in clusters:
            if same(answers[cluster[0]], answer):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def cons_at_k(answers: Sequence[str | None], correct: Sequence[float],
              same: Callable[[str, str], bool]) -> float:
    """Majority-vote accuracy: the most common answer's correctness; a tie of m classes counts 1/m each.

    Averaging over tied classes is the expectation of breaking the tie at random, so no answer order
    is favoured. A problem with no extracted answer scores 0.
    """
    clusters = majority_clusters(answers, same)
    if not clusters:
        return 0.0
    top = max(map(len, clusters))
    winners = [c for c in clusters if len(c) == top]
    return sum(float(correct[c[0]]) for c in winners) / len(winners)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, median, 90th percentile and max of response lengths (tokens)."""
    if not lengths:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    a = np.asarray(lengths, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "max": float(a.max())}


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: powers of two up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]
