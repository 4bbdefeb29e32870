"""The Triton decode kernel against the PyTorch reference, run on the CPU by Triton's interpreter."""

import importlib.util

import pytest
import torch
from conftest import triton_interpreted

from r1kit.rollout.engine.attention import paged_decode_reference

CHECK = """
import torch
from r1kit.rollout.engine.attention import paged_decode_reference, paged_decode_triton
torch.manual_seed(0)
for heads, kv_heads, head_dim in ((9, 3, 64), (4, 4, 32), (8, 2, 128)):
    block_size, blocks = 16, 60
    k_cache = torch.randn(blocks * block_size, kv_heads, head_dim).half()
    v_cache = torch.randn(blocks * block_size, kv_heads, head_dim).half()
    lens = torch.tensor([1, 17, 200, 70], dtype=torch.int32)  # one token, a block and one, several tiles
    tables = torch.randperm(blocks).view(4, 15).to(torch.int32)  # no block in two rows, as in the engine
    slots = torch.stack([tables[b, (n - 1) // block_size] * block_size + (n - 1) % block_size
                         for b, n in enumerate(lens.tolist())]).long()
    # q, k and v as the engine passes them: views of one projection's output, rows wider than a head set
    qkv = torch.randn(4, (heads + 2 * kv_heads) * head_dim + 8).half()
    q, k, v = (part.view(4, -1, head_dim) for part in qkv[:, :-8].split([heads * head_dim,
                                                                        kv_heads * head_dim, kv_heads * head_dim], -1))
    angles = torch.rand(4, head_dim // 2).repeat(1, 2) * 6.28
    cos, sin = angles.cos().half(), angles.sin().half()
    ref_caches = k_cache.float(), v_cache.float()
    ours = paged_decode_triton(q, k, v, cos, sin, slots, k_cache, v_cache, tables, lens, block_size).float()
    ref = paged_decode_reference(q.float(), k.float(), v.float(), cos.float(), sin.float(), slots, *ref_caches,
                                 tables, lens, block_size)
    # the stored k was rotated in fp32 and rounded once: within one fp16 step of the fp32 reference's
    same_cache = torch.equal(v_cache.float(), ref_caches[1]) and torch.allclose(k_cache.float(), ref_caches[0],
                                                                                 rtol=1e-3, atol=1e-3)
    print(heads, kv_heads, head_dim, same_cache, (ours - ref).abs().max().item())
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_reference_in_the_interpreter():
    lines = triton_interpreted(CHECK)
    assert len(lines) == 3 and all(line[3] == "True" for line in lines)  # the new k and v stored in their slots
    assert max(float(line[-1]) for line in lines) < 2e-3  # fp16 inputs, fp32 accumulation


PREFILL = """
import torch
from r1kit.rollout.engine.attention import paged_decode_reference, paged_decode_triton
torch.manual_seed(0)
heads, kv_heads, head_dim, block_size = 8, 2, 32, 16
# two prompts' chunks in one call, a row per token: 20 tokens of one from position 0, and 30 of another from
# position 50, whose first 50 positions are cached already; each row attends to the rows before it in its prompt
tables = torch.tensor([[4, 9, 1, 0, 0], [7, 2, 8, 3, 5]], dtype=torch.int32)
chunks = [(0, 0, 20), (1, 50, 80)]
rows = torch.tensor([c for c, start, end in chunks for _ in range(start, end)])
positions = torch.cat([torch.arange(start, end) for _, start, end in chunks])
slots = (tables[rows, positions // block_size].long() * block_size + positions % block_size)
lens = (positions + 1).to(torch.int32)
k_cache = torch.randn(10 * block_size, kv_heads, head_dim).half()
v_cache = torch.randn(10 * block_size, kv_heads, head_dim).half()
q = torch.randn(len(rows), heads, head_dim).half()
k, v = torch.randn(len(rows), kv_heads, head_dim).half(), torch.randn(len(rows), kv_heads, head_dim).half()
angles = positions[:, None] * torch.rand(head_dim // 2).repeat(2)
cos, sin = angles.cos().half(), angles.sin().half()
ref_caches = k_cache.float(), v_cache.float()
ours = paged_decode_triton(q, k, v, cos, sin, slots, k_cache, v_cache, tables[rows], lens, block_size,
                           prefill=True).float()
ref = paged_decode_reference(q.float(), k.float(), v.float(), cos.float(), sin.float(), slots, *ref_caches,
                             tables[rows], lens, block_size, prefill=True)
same_cache = torch.equal(v_cache.float(), ref_caches[1]) and torch.allclose(k_cache.float(), ref_caches[0],
                                                                             rtol=1e-3, atol=1e-3)
print(same_cache, (ours - ref).abs().max().item())
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_prefill_mode_matches_reference_in_the_interpreter():
    # rows that are one prompt's tokens see each other's keys: all stored before any row attends
    (line,) = triton_interpreted(PREFILL)
    assert line[0] == "True" and float(line[1]) < 2e-3


def test_reference_equals_dense_attention_over_the_gathered_context():
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(32, 2, 8), torch.randn(32, 2, 8)
    tables = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)
    lens = torch.tensor([6, 3], dtype=torch.int32)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    cos, sin = torch.ones(2, 8), torch.zeros(2, 8)  # position 0: no rotation
    out = paged_decode_reference(q, k, v, cos, sin, torch.tensor([5, 2]), k_cache, v_cache, tables, lens, block_size=4)
    assert torch.equal(k_cache[[5, 2]], k) and torch.equal(v_cache[[5, 2]], v)
    for b, slots in enumerate(([12, 13, 14, 15, 4, 5], [0, 1, 2])):
        keys, values = k_cache[slots].repeat_interleave(2, 1), v_cache[slots].repeat_interleave(2, 1)
        weights = torch.einsum("hd,thd->ht", q[b], keys).div(8**0.5).softmax(-1)
        assert torch.allclose(out[b], torch.einsum("ht,thd->hd", weights, values), atol=1e-5)


def test_rotation_is_hf_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from r1kit.rollout.engine.attention import rotate

    torch.manual_seed(0)
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    angles = torch.rand(3, 4).repeat(1, 2)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, angles.cos(), angles.sin())  # (tokens, heads, dim): unsqueeze dim 1
    assert torch.equal(rotate(q, angles.cos(), angles.sin()), ref_q)
    assert torch.equal(rotate(k, angles.cos(), angles.sin()), ref_k)
