"""The fused small-batch linear kernel against its PyTorch reference (Triton's interpreter on the CPU), and
the engine's layers through it."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from r1kit.rollout.engine.small_linear import norm_linear_reference

CHECK = """
import torch
from r1kit.rollout.engine.small_linear import norm_linear_reference, norm_linear_triton
torch.manual_seed(0)
def rand(*shape):
    return (torch.randn(*shape) * 0.5).half()
for rows, k, n in ((1, 96, 40), (3, 200, 16), (16, 64, 130)):
    x, residual, add_to = rand(rows, k), rand(rows, k), rand(rows, n)
    norm, bias = rand(k) + 1, rand(n)
    cases = {"qkv": dict(weight=rand(n, k), residual=residual, norm=norm, bias=bias),
             "o": dict(weight=rand(n, k), add_to=add_to), "gate_up": dict(weight=rand(2 * n, k), norm=norm, gated=True),
             "down": dict(weight=rand(n, k))}
    for name, case in cases.items():
        args = {"residual": None, "norm": None, "bias": None, "add_to": None, "eps": 1e-5, "gated": False, **case}
        out, stream = norm_linear_triton(x, **args)
        ref, ref_stream = norm_linear_reference(x.float(), **{a: v.float() if torch.is_tensor(v) else v
                                                              for a, v in args.items()})
        # the stream is written in fp16, rounded as eager fp16 rounds x + residual
        same_stream = torch.equal(stream, x + residual) if name == "qkv" else stream.numel() == 0
        error = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        print(name, rows, tuple(out.shape) == tuple(ref.shape), same_stream, error)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert len(lines) == 12 and all(line[2] == "True" and line[3] == "True" for line in lines)
    assert max(float(line[-1]) for line in lines) < 2e-3  # relative: fp16 operands and roundings, fp32 sums


def test_reference_is_the_layers_unfused_ops():
    torch.manual_seed(0)
    x, residual, norm = torch.randn(2, 8), torch.randn(2, 8), torch.rand(8) + 0.5
    gate_up = torch.randn(12, 8)
    stream = x + residual
    h = norm * stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + 1e-6)
    out, got_stream = norm_linear_reference(x, gate_up, residual, norm, None, None, 1e-6, True)
    assert torch.equal(got_stream, stream)
    assert torch.allclose(out, torch.nn.functional.silu(h @ gate_up[:6].T) * (h @ gate_up[6:].T), atol=1e-6)
    out, got_stream = norm_linear_reference(x, gate_up, None, None, torch.ones(12), residual[:, :1], 1e-6, False)
    assert got_stream.numel() == 0 and torch.allclose(out, residual[:, :1] + x @ gate_up.T + 1, atol=1e-6)
