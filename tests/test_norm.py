"""The residual add + RMSNorm op: its Triton kernel (run by Triton's CPU interpreter) against PyTorch, and the
PyTorch path against HF's RMSNorm."""

import importlib.util

import pytest
import torch
from conftest import triton_interpreted

CHECK = """
import torch
from r1kit.rollout.engine.norm import add_rms_norm_reference, add_rms_norm_triton
torch.manual_seed(0)
for width in (576, 64):
    # fp16: the interpreter rounds fp32 to bf16 by truncation, where the GPU rounds to nearest as PyTorch does.
    # x as the engine may pass it: a view whose rows are wider than the norm
    x = (torch.randn(3, width + 8) * 4)[:, :width].half()
    residual, weight = (torch.randn(3, width) * 4).half(), (torch.rand(width) + 0.5).half()
    stream, out = add_rms_norm_triton(x, residual, weight, 1e-5)
    ref_stream, ref = add_rms_norm_reference(x, residual, weight, 1e-5)
    steps = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()  # fp16 steps apart (same signs)
    print(width, torch.equal(stream, ref_stream), (out == ref).float().mean().item(), steps.max().item())
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_reference_in_the_interpreter():
    lines = triton_interpreted(CHECK)
    assert [line[:2] for line in lines] == [["576", "True"], ["64", "True"]]  # the sum rounded as PyTorch rounds it
    # the norm summed in another order: a few values one fp16 step apart, none more
    assert all(float(line[2]) > 0.95 and float(line[3]) <= 1.0 for line in lines)


def test_reference_is_hf_rms_norm_of_the_sum():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from r1kit.rollout.engine.norm import add_rms_norm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-6)
    norm.weight.data = torch.rand(16) + 0.5
    x, residual = torch.randn(5, 16), torch.randn(5, 16)
    stream, out = add_rms_norm(x, residual, norm.weight.data, 1e-6)
    assert torch.equal(stream, residual + x) and torch.equal(out, norm(residual + x))
