"""The Triton threshold filter (top-k, min-p, top-p without a sort) against the sort-based reference, run on the
CPU by Triton's interpreter."""

import importlib.util

import pytest
from conftest import triton_interpreted

CHECK = """
import torch
from r1kit.rollout.sampler import filter_logits
from r1kit.rollout.thresholds import threshold_filter
torch.manual_seed(1)
rows, vocab = 40, 3000
logits = torch.randn(rows, vocab) * torch.rand(rows, 1) * 12  # flat to peaked rows
logits[0, :100] = float("-inf")  # tokens a model rules out
top_k = torch.randint(0, 60, (rows,)) * (torch.rand(rows) < 0.5)
top_p = torch.rand(rows) * 0.6 + 0.4
min_p = torch.rand(rows) * 0.2 * (torch.rand(rows) < 0.3)
# every way to switch a filter off, and the extremes: top-p 0 keeps the best token alone, k past the vocabulary
top_k[:6], top_p[:6], min_p[:6] = (torch.tensor(v) for v in ([0, 20, 0, 0, vocab, 5], [1.0, 1.0, 0.0, 1.0, 0.99, 0.95],
                                                             [0.0, 0.0, 0.0, 0.1, 0.0, 0.0]))
ref = filter_logits(logits, top_k, top_p, min_p)
ours = threshold_filter(logits, top_k, top_p, min_p)
kept = ~ours.isinf()
# row 0 cuts nothing: the sort's fp32 cumulative sum reaches 1.0 before the last tokens and drops them (each below
# 1e-6 of the mass here); the thresholds keep every finite score
tail = (kept[0] & ref[0].isinf())
print(int((kept[1:] != ~ref[1:].isinf()).sum()), torch.equal(ref[1:][kept[1:]], ours[1:][kept[1:]]), int(kept.sum()),
      kept.sum(1)[:6].tolist(), float(logits[0].softmax(-1)[tail].max()))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_threshold_filter_keeps_what_the_sort_keeps_in_the_interpreter():
    ((mismatched, same_values, kept, *first, tail),) = triton_interpreted(CHECK)
    assert mismatched == "0" and same_values == "True"
    # no filter; top-k 20; top-p 0: the best token; min-p 0.1; k past the vocabulary, then top-p; top-k 5, top-p
    assert "".join(first).startswith("[2900,20,1,") and int(kept) > 1000
    assert float(tail) < 1e-6


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_threshold_kernel_compiles_for_hopper_without_a_gpu():
    # the interpreter runs what the compiler may refuse: compile it for sm_90 (H100, H200) here, to PTX and cubin
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from r1kit.rollout.thresholds import LANES, PASSES, _thresholds_kernel

    signature = {"scores_ptr": "*fp32", "out_ptr": "*fp32", "top_k_ptr": "*i64", "top_p_ptr": "*fp32",
                 "min_p_ptr": "*fp32", "vocab": "i32", "stride_s": "i32", "stride_o": "i32", "BLOCK": "constexpr",
                 "LANES": "constexpr", "PASSES": "constexpr"}
    source = ASTSource(_thresholds_kernel, signature, constexprs={"BLOCK": 1024, "LANES": LANES, "PASSES": PASSES})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert kernel.asm["cubin"] and ".local" not in kernel.asm["ptx"]  # no spills to local memory
