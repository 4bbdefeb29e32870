"""Decode attention over the paged KV cache: one new query token per sequence against its cached context.

Two implementations of one contract, `out = paged_decode(q, k, v, slots, k_cache, v_cache, tables, lens,
block_size)`: write the new token's k and v at its slot, then attend over the sequence's context. A Triton
kernel (flash-decoding without the split: one program per sequence and KV head, online softmax over tiles
of the cached context read in place through the block table, then the new token from registers, which it
also stores: one kernel a layer where a copy into the cache and an attention were three) and a PyTorch
reference that writes, gathers the context and calls SDPA. The kernel reads every cached token once, which
is what bounds a decode step; the reference copies the whole context per layer first. The kernel is
registered as a custom op so that `torch.compile` keeps it whole inside the compiled decode step.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the reference path serves
    triton = None


def paged_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                           block_size: int) -> torch.Tensor:
    """Store (B, kv_heads, head_dim) k and v at slots; the (B, heads, head_dim) attention output of q against
    each row's first lens[b] tokens (the new one included)."""
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)
    positions = torch.arange(int(lens.max()), device=q.device)
    context = tables[:, positions // block_size].long() * block_size + positions % block_size
    mask = (positions[None, :] < lens[:, None])[:, None, None, :]
    keys, values = k_cache[context].transpose(1, 2), v_cache[context].transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, enable_gqa=True)
    return out[:, :, 0]


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_new_ptr, v_new_ptr, slots_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
                             scale, stride_qb, stride_qh, stride_nb, stride_nh, stride_cs, stride_ch, stride_tb,
                             stride_ob, stride_oh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
        seq, kv_head = tl.program_id(0), tl.program_id(1)
        cached = tl.load(lens_ptr + seq) - 1  # the context before the new token
        g, d = tl.arange(0, GROUP_PAD), tl.arange(0, HEAD_DIM)
        real = g < GROUP  # heads padded up to the smallest shape tl.dot takes
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=real[:, None], other=0.0)
        k_new = tl.load(k_new_ptr + seq * stride_nb + kv_head * stride_nh + d)
        v_new = tl.load(v_new_ptr + seq * stride_nb + kv_head * stride_nh + d)
        slot = tl.load(slots_ptr + seq).to(tl.int64) * stride_cs + kv_head * stride_ch
        tl.store(k_ptr + slot + d, k_new)  # read by later steps only: this one takes it from registers
        tl.store(v_ptr + slot + d, v_new)
        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        for start in range(0, cached, TILE):
            pos = start + tl.arange(0, TILE)
            valid = pos < cached
            block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
            rows = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
            k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            total = total * alpha + tl.sum(p, 1)
            m = m_new
        score_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        m_new = tl.maximum(m, score_new)
        p_new, alpha = tl.exp(score_new - m_new), tl.exp(m - m_new)
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        out = acc / (total * alpha + p_new)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=real[:, None])


def kernel_supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the Triton kernel runs this case: triton present, a GPU, 16-bit floats, a power-of-2 head_dim."""
    return (triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def paged_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                        block_size: int) -> torch.Tensor:
    """The same contract as paged_decode_reference, computed by the Triton kernel."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    tile = 64 if head_dim <= 64 else 32  # keeps a tile of K and V in registers
    _paged_decode_kernel[(batch, kv_heads)](
        q, k, v, slots, k_cache, v_cache, tables, lens, out, head_dim**-0.5,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k_cache.stride(0), k_cache.stride(1), tables.stride(0),
        out.stride(0), out.stride(1), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=tile)
    return out


_DECODERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def register_cache(owner) -> int:
    """Make `owner`'s k_cache, v_cache and block_size reachable from the decode op; the key to pass it."""
    key = id(owner)
    _DECODERS[key] = owner
    return key


# The op finds its KV cache through a key, as vLLM's attention op does, so that a compiled decode step
# never sees the cache as a graph input it mutates (which compile would functionalize into a copy).
@torch.library.custom_op("r1kit::paged_decode", mutates_args=())
def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, cache: int, layer: int) -> torch.Tensor:
    """Write the new tokens' k and v at `slots` of layer `layer`, then attend (B, heads, head_dim) q."""
    owner = _DECODERS[cache]
    attend = paged_decode_triton if kernel_supports(q.device, q.dtype, q.shape[-1]) else paged_decode_reference
    return attend(q, k, v, slots, owner.k_cache[layer], owner.v_cache[layer], tables, lens, owner.block_size)


@paged_decode.register_fake
def _(q, k, v, slots, tables, lens, cache, layer):
    return torch.empty_like(q)
