"""The few-row projection kernel against its PyTorch reference (Triton's CPU interpreter), and the reference
against the unfused layer it replaces."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_interpreted

from r1kit.rollout.engine.gemv import GEMV_ROWS, kernel_supports, project, project_reference, small

CHECK = """
import torch
from r1kit.rollout.engine.gemv import project_reference, project_triton
torch.manual_seed(0)
# 1-4 rows; reductions shorter than, equal to and past a tile (with a ragged end); a bias; a gate/up pair;
# rows of x and w wider than the projection (views, as the engine's fused buffers are)
cases = ((1, 24, 40, False, True), (2, 64, 64, True, False), (3, 40, 130, False, False), (4, 32, 1100, True, True))
for block_k in (64, 0):  # several steps along the reduction; the chosen tiles (one step)
    for rows, n, k, pair, bias in cases:
        x = torch.randn(rows, k + 8).half()[:, :k]
        w = (torch.randn(n, k + 8) * 0.05).half()[:, :k]
        b = torch.randn(n).half() if bias else None
        ours = project_triton(x, w, b, pair, 8, block_k)
        ref = project_reference(x.float(), w.float(), None if b is None else b.float(), pair)
        error = ((ours.float() - ref).abs().max() / ref.abs().max()).item()
        print(block_k, rows, tuple(ours.shape) == tuple(ref.shape), ours.dtype == x.dtype, error)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_matches_reference_in_the_interpreter():
    lines = triton_interpreted(CHECK)
    assert len(lines) == 8
    assert all(line[2] == "True" and line[3] == "True" for line in lines)  # shape, and the input's dtype
    assert max(float(line[-1]) for line in lines) < 2e-3  # fp16 inputs and outputs, fp32 accumulation


def test_reference_pair_is_the_swiglu_of_the_two_halves():
    torch.manual_seed(0)
    x, gate, up = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8, 16)
    out = project_reference(x, torch.cat([gate, up]), None, pair=True)
    assert torch.allclose(out, F.silu(x @ gate.T) * (x @ up.T), atol=1e-6)


def test_kernel_is_chosen_for_few_rows_through_small_weights_only():
    embedded_gate_up, seven_b_o = torch.empty(3072, 576), torch.empty(3584, 3584)
    assert small(2, embedded_gate_up) and small(GEMV_ROWS, embedded_gate_up)
    assert not small(GEMV_ROWS + 1, embedded_gate_up)
    assert not small(2, seven_b_o)  # cuBLAS is faster there
    assert not small(2, torch.empty(16, 4096))  # a row longer than one tile


def test_op_runs_the_reference_where_the_kernel_does_not():
    torch.manual_seed(0)
    x, w, bias = torch.randn(2, 16), torch.randn(12, 16), torch.randn(12)
    assert not kernel_supports(x, w)  # a CPU tensor
    assert not kernel_supports(torch.randn(GEMV_ROWS + 1, 16), w)
    assert torch.equal(project(x, w, bias), F.linear(x, w, bias))
    assert torch.equal(project(x, w, None, True), project_reference(x, w, None, True))
