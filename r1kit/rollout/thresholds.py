"""top-k, min-p and top-p filters as per-row score thresholds found by a Triton kernel, without a sort.

The sampler's reference (`sampler.filter_logits`) sorts the whole vocabulary of every row: on an H200 at 512 rows
and a 49k vocabulary that sort was ~3.3 ms of an 8.3-ms decode step. The same sets are threshold sets: a token
is in the top-k when fewer than k tokens score above it; it passes min-p when its score is at least the best
score + log(min_p); and, among the tokens those leave, it is in the nucleus when the probability mass scoring
strictly above it is below top_p of theirs. Each count and mass is monotone in the threshold, so a bisection on
the score finds it: one program per row walks its row 13 times (23 with a top-k), trying 16 thresholds a pass,
instead of sorting it. Where tokens tie at a threshold all of them are kept, where the sort keeps the first ones
in its order; where nothing is cut (top-p 1) every finite score is kept, where the sort's float32 cumulative sum
reaches 1 early and drops the last, least likely tokens; nothing else differs but the order of floating-point
sums.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the sort serves
    triton = None

LANES = 16  # thresholds tried in one pass over a row: each pass narrows the bracket 17-fold
PASSES = 10  # 17^10 > 2^40: past fp32's resolution of any score in the row's range


if triton is not None:

    @triton.jit
    def _tried(lo, hi, LANES: tl.constexpr):
        """LANES thresholds spread evenly inside (lo, hi)."""
        return lo + (hi - lo) * ((tl.arange(0, LANES) + 1).to(tl.float32) / (LANES + 1))

    @triton.jit
    def _narrowed(lo, hi, tried, low_side, LANES: tl.constexpr):
        """The bracket between the last threshold on lo's side and the first past it (low_side is true for a
        prefix of the thresholds: the quantity searched falls as the threshold rises)."""
        lanes = tl.arange(0, LANES)
        n = tl.sum(low_side.to(tl.int32), 0)
        new_lo = tl.where(n > 0, tl.sum(tl.where(lanes == n - 1, tried, 0.0), 0), lo)
        new_hi = tl.where(n < LANES, tl.sum(tl.where(lanes == n, tried, 0.0), 0), hi)
        return new_lo, new_hi

    @triton.jit
    def _counts_above(row_ptr, vocab, tried, BLOCK: tl.constexpr):
        """How many of the row's scores lie above each threshold."""
        cols = tl.arange(0, BLOCK)
        counts = tl.zeros((tried.shape[0], BLOCK), tl.float32)  # summed once at the end, not across warps a chunk
        for start in range(0, vocab, BLOCK):
            x = tl.load(row_ptr + start + cols, mask=start + cols < vocab, other=float("-inf"))
            counts += (x[None, :] > tried[:, None]).to(tl.float32)
        return tl.sum(counts, 1)

    @triton.jit
    def _masses_above(row_ptr, vocab, cut, floor, top, tried, BLOCK: tl.constexpr):
        """The probability mass (relative to the best score's) of the set's scores (above cut, at least floor)
        above each threshold."""
        cols = tl.arange(0, BLOCK)
        masses = tl.zeros((tried.shape[0], BLOCK), tl.float32)
        for start in range(0, vocab, BLOCK):
            x = tl.load(row_ptr + start + cols, mask=start + cols < vocab, other=float("-inf"))
            mass = tl.where((x > cut) & (x >= floor), tl.exp(x - top), 0.0)
            masses += tl.where(x[None, :] > tried[:, None], mass[None, :], 0.0)
        return tl.sum(masses, 1)

    @triton.jit
    def _thresholds_kernel(scores_ptr, out_ptr, top_k_ptr, top_p_ptr, min_p_ptr, vocab, stride_s, stride_o,
                           BLOCK: tl.constexpr, LANES: tl.constexpr, PASSES: tl.constexpr):
        row = tl.program_id(0)
        src = scores_ptr + row.to(tl.int64) * stride_s
        cols = tl.arange(0, BLOCK)
        top = tl.full((), float("-inf"), tl.float32)
        bottom = tl.full((), float("inf"), tl.float32)  # the lowest finite score
        for start in range(0, vocab, BLOCK):
            x = tl.load(src + start + cols, mask=start + cols < vocab, other=float("-inf"))
            top = tl.maximum(top, tl.max(x, 0))
            bottom = tl.minimum(bottom, tl.min(tl.where(x > float("-inf"), x, float("inf")), 0))
        below = bottom - 1.0  # under every finite score
        k = tl.load(top_k_ptr + row)
        cut = below  # top-k: the scores above it are the k best (and any that tie with the k-th)
        if (k > 0) & (k < vocab):
            lo, hi = below, top  # at least k scores above lo, fewer than k above hi
            for _ in range(PASSES):
                tried = _tried(lo, hi, LANES)
                lo, hi = _narrowed(lo, hi, tried, _counts_above(src, vocab, tried, BLOCK) >= k, LANES)
            cut = lo
        # min-p: a probability of at least min_p x the best one's
        min_p = tl.load(min_p_ptr + row)
        floor = tl.where(min_p > 0, top + tl.log(tl.maximum(min_p, 1e-30)), below)
        top_p = tl.load(top_p_ptr + row)
        keep_above = below
        if top_p < 1.0:
            everything = tl.full((LANES,), float("-inf"), tl.float32)  # every lane: the set's whole mass
            total = tl.max(_masses_above(src, vocab, cut, floor, top, everything, BLOCK), 0)
            target = top_p * total  # the nucleus: the set's mass above a kept score is below top_p of the set's
            lo, hi = below, top  # the mass above lo reaches the target, above hi it does not
            for _ in range(PASSES):
                tried = _tried(lo, hi, LANES)
                masses = _masses_above(src, vocab, cut, floor, top, tried, BLOCK)
                lo, hi = _narrowed(lo, hi, tried, masses >= target, LANES)
            keep_above = lo
        dst = out_ptr + row.to(tl.int64) * stride_o
        for start in range(0, vocab, BLOCK):
            valid = start + cols < vocab
            x = tl.load(src + start + cols, mask=valid, other=float("-inf"))
            kept = ((x > cut) & (x >= floor) & (x > keep_above)) | (x == top)  # the best score always stays
            tl.store(dst + start + cols, tl.where(kept, x, float("-inf")), mask=valid)


def kernel_filters(scores: torch.Tensor) -> bool:
    """Whether the Triton kernel filters these scores (a GPU, float32 rows)."""
    return triton is not None and scores.is_cuda and scores.dtype == torch.float32


def threshold_filter(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
                     ) -> torch.Tensor:
    """filter_logits' contract (scores outside each row's top-k, min-p and then nucleus set to -inf; the best
    token always kept) by the Triton kernel."""
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    out = torch.empty_like(scores)
    rows, vocab = scores.shape
    _thresholds_kernel[(rows,)](scores, out, top_k, top_p, min_p, vocab, scores.stride(0), out.stride(0),
                                BLOCK=1024, LANES=LANES, PASSES=PASSES, num_warps=8)
    return out
