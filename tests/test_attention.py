"""The Triton decode kernel against the PyTorch reference, run on the CPU by Triton's interpreter."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from r1kit.rollout.engine.attention import paged_decode_reference

CHECK = """
import torch
from r1kit.rollout.engine.attention import paged_decode_reference, paged_decode_triton
torch.manual_seed(0)
for heads, kv_heads, head_dim in ((9, 3, 64), (4, 4, 32), (8, 2, 128)):
    block_size, blocks = 16, 40
    k_cache = torch.randn(blocks * block_size, kv_heads, head_dim).half()
    v_cache = torch.randn(blocks * block_size, kv_heads, head_dim).half()
    lens = torch.tensor([1, 17, 100, 70], dtype=torch.int32)  # one token, a block and one, many tiles
    tables = torch.randperm(blocks).view(4, 10).to(torch.int32)  # no block in two rows, as in the engine
    slots = torch.stack([tables[b, (n - 1) // block_size] * block_size + (n - 1) % block_size
                         for b, n in enumerate(lens.tolist())]).long()
    q, k, v = (torch.randn(4, h, head_dim).half() for h in (heads, kv_heads, kv_heads))
    ref_caches = k_cache.float(), v_cache.float()
    ours = paged_decode_triton(q, k, v, slots, k_cache, v_cache, tables, lens, block_size).float()
    ref = paged_decode_reference(q.float(), k.float(), v.float(), slots, *ref_caches, tables, lens, block_size)
    same_cache = all(torch.equal(a.float(), b) for a, b in zip((k_cache, v_cache), ref_caches))
    print(heads, kv_heads, head_dim, same_cache, (ours - ref).abs().max().item())
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines()]
    assert len(lines) == 3 and all(line[3] == "True" for line in lines)  # the new k and v stored in their slots
    assert max(float(line[-1]) for line in lines) < 2e-3  # fp16 inputs, fp32 accumulation


def test_reference_equals_dense_attention_over_the_gathered_context():
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(32, 2, 8), torch.randn(32, 2, 8)
    tables = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)
    lens = torch.tensor([6, 3], dtype=torch.int32)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    out = paged_decode_reference(q, k, v, torch.tensor([5, 2]), k_cache, v_cache, tables, lens, block_size=4)
    assert torch.equal(k_cache[[5, 2]], k) and torch.equal(v_cache[[5, 2]], v)
    for b, slots in enumerate(([12, 13, 14, 15, 4, 5], [0, 1, 2])):
        keys, values = k_cache[slots].repeat_interleave(2, 1), v_cache[slots].repeat_interleave(2, 1)
        weights = torch.einsum("hd,thd->ht", q[b], keys).div(8**0.5).softmax(-1)
        assert torch.allclose(out[b], torch.einsum("ht,thd->hd", weights, values), atol=1e-5)
