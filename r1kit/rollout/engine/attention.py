"""Decode attention over the paged KV cache: one new query token per sequence against its cached context.

Two implementations of one contract, `out = paged_decode(q, k, v, cos, sin, slots, k_cache, v_cache, tables,
lens, block_size)`: rotate the new token's q and k (rotary embedding), write its k and v at its slot, then
attend over the sequence's context. A Triton kernel (flash-decoding without the split: one program per
sequence and KV head; it rotates q and k in registers, reading them where the q/k/v projection left them,
online softmax over tiles of the cached context read in place through the block table, then the new
token from registers, which it also stores: one kernel a layer where the rotary, the copies into the
cache and the attention were five) and a PyTorch reference that rotates, writes, gathers the context and
calls SDPA. The kernel reads every cached token once, which
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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (HF's rotate-half form) of (tokens, heads, head_dim) with (tokens, head_dim) cos and sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def paged_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           lens: torch.Tensor, block_size: int, prefill: bool = False) -> torch.Tensor:
    """Rotate (B, heads, head_dim) q and (B, kv_heads, head_dim) k by (B, head_dim) cos and sin, store k and v
    at slots; the attention output (B, heads, head_dim) of q against each row's first lens[b] tokens (the new
    one included). Every row's k and v are stored before any row attends, so rows may be one prompt's tokens
    (`prefill`: the same computation here)."""
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
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
    def _rotated(ptr, offsets, partners, first_half, cos, sin, mask):
        """x * cos + rotate_half(x) * sin of the values at offsets (their rotate-half partners at partners),
        computed in fp32 and rounded back once."""
        x = tl.load(ptr + offsets, mask=mask, other=0.0)
        partner = tl.load(ptr + partners, mask=mask, other=0.0).to(tl.float32)
        return (x.to(tl.float32) * cos + tl.where(first_half, -partner, partner) * sin).to(x.dtype)

    @triton.jit
    def _new_kv(k_new_ptr, v_new_ptr, seq, kv_head, stride_kb, stride_kh, stride_vb, stride_vh, cos, sin,
                HEAD_DIM: tl.constexpr):
        """A row's new k (rotated) and v for one KV head: what both kernels store, computed one way."""
        d = tl.arange(0, HEAD_DIM)
        k_row = seq * stride_kb + kv_head * stride_kh
        k_new = _rotated(k_new_ptr, k_row + d, k_row + (d + HEAD_DIM // 2) % HEAD_DIM, d < HEAD_DIM // 2, cos, sin,
                         d < HEAD_DIM)
        return k_new, tl.load(v_new_ptr + seq * stride_vb + kv_head * stride_vh + d)

    @triton.jit
    def _store_kv(k_ptr, v_ptr, slots_ptr, seq, kv_head, stride_cs, stride_ch, k_new, v_new, HEAD_DIM: tl.constexpr):
        """Store a row's new k and v for one KV head at the row's slot."""
        d = tl.arange(0, HEAD_DIM)
        slot = tl.load(slots_ptr + seq).to(tl.int64) * stride_cs + kv_head * stride_ch
        tl.store(k_ptr + slot + d, k_new)
        tl.store(v_ptr + slot + d, v_new)

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, slots_ptr, k_ptr, v_ptr, tables_ptr,
                             lens_ptr, out_ptr, scale, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb,
                             stride_vh, stride_rb, stride_cs, stride_ch, stride_tb, stride_ob, stride_oh,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, STORE: tl.constexpr):
        seq, kv_head = tl.program_id(0), tl.program_id(1)
        cached = tl.load(lens_ptr + seq) - 1  # the context before the new token
        g, d = tl.arange(0, GROUP_PAD), tl.arange(0, HEAD_DIM)
        real = g < GROUP  # heads padded up to the smallest shape tl.dot takes
        heads = kv_head * GROUP + g
        cos = tl.load(cos_ptr + seq * stride_rb + d).to(tl.float32)
        sin = tl.load(sin_ptr + seq * stride_rb + d).to(tl.float32)
        partner, first_half = (d + HEAD_DIM // 2) % HEAD_DIM, d < HEAD_DIM // 2
        q_rows = seq * stride_qb + heads[:, None] * stride_qh
        q = _rotated(q_ptr, q_rows + d[None, :], q_rows + partner[None, :], first_half, cos, sin, real[:, None])
        k_new, v_new = _new_kv(k_new_ptr, v_new_ptr, seq, kv_head, stride_kb, stride_kh, stride_vb, stride_vh, cos,
                               sin, HEAD_DIM)
        if STORE:  # read by later steps only: this one takes it from registers
            _store_kv(k_ptr, v_ptr, slots_ptr, seq, kv_head, stride_cs, stride_ch, k_new, v_new, HEAD_DIM)
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

    @triton.jit
    def _store_kv_kernel(k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, slots_ptr, k_ptr, v_ptr, stride_kb, stride_kh,
                         stride_vb, stride_vh, stride_rb, stride_cs, stride_ch, HEAD_DIM: tl.constexpr):
        """Rotate one row's k for one KV head and store it and v at the row's slot, as the decode kernel does."""
        seq, kv_head = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, HEAD_DIM)
        cos = tl.load(cos_ptr + seq * stride_rb + d).to(tl.float32)
        sin = tl.load(sin_ptr + seq * stride_rb + d).to(tl.float32)
        k_new, v_new = _new_kv(k_new_ptr, v_new_ptr, seq, kv_head, stride_kb, stride_kh, stride_vb, stride_vh, cos,
                               sin, HEAD_DIM)
        _store_kv(k_ptr, v_ptr, slots_ptr, seq, kv_head, stride_cs, stride_ch, k_new, v_new, HEAD_DIM)


def kernel_supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the Triton kernel runs this case: triton present, a GPU, 16-bit floats, a power-of-2 head_dim."""
    return (triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def paged_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                        lens: torch.Tensor, block_size: int, prefill: bool = False) -> torch.Tensor:
    """The same contract as paged_decode_reference, computed by the Triton kernel. q, k and v are read where
    they lie (views of one projection's output) as long as each head's values are contiguous. `prefill`: rows
    are a prompt's tokens, each attending to the ones before it, so every row's k and v are stored by a kernel
    of their own first (in one kernel a row could read a slot before the row that writes it has)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cos, sin = cos.contiguous(), sin.contiguous()  # one row stride for both
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = q.new_empty(q.shape)
    # A few sequences are a few programs, each walking its context alone: wider tiles walk it in fewer
    # steps. Many fill the GPU, where narrower tiles and two warps a program were fastest. bench/attention_tiles.py
    # on the H200, at head_dim 64 (SmolLM2): 1-8 sequences at a context of 300, 6.2 us against 7.8 with 64-token
    # tiles; 512, 40 us against 43 with four warps. At head_dim 128 (R1-Distill-Qwen-7B and -32B's heads), the
    # same choice against halved tiles and four warps: one sequence at 300, 8.5 us against 10.3; 256 at 300, 47.7
    # us against 54.9 (7B) and 90.5 against 101.1 (32B); within 10% either way at a context of 48.
    few = batch <= 16
    tile, warps = (128, 4) if few else (64, 2)
    if prefill:
        _store_kv_kernel[(batch, kv_heads)](k, v, cos, sin, slots, k_cache, v_cache, k.stride(0), k.stride(1),
                                            v.stride(0), v.stride(1), cos.stride(0), k_cache.stride(0),
                                            k_cache.stride(1), HEAD_DIM=head_dim)
    _paged_decode_kernel[(batch, kv_heads)](
        q, k, v, cos, sin, slots, k_cache, v_cache, tables, lens, out, head_dim**-0.5, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        tables.stride(0), out.stride(0), out.stride(1), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE=tile, STORE=not prefill, num_warps=warps)
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
def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, cache: int, layer: int,
                 prefill: bool = False) -> torch.Tensor:
    """Rotate the new tokens' q and k, write k and v at `slots` of layer `layer`, then attend q: (B, heads,
    head_dim). `prefill`: the rows are prompt tokens that may attend to each other."""
    owner = _DECODERS[cache]
    attend = paged_decode_triton if kernel_supports(q.device, q.dtype, q.shape[-1]) else paged_decode_reference
    return attend(q, k, v, cos, sin, slots, owner.k_cache[layer], owner.v_cache[layer], tables, lens,
                  owner.block_size, prefill)


@paged_decode.register_fake
def _(q, k, v, cos, sin, slots, tables, lens, cache, layer, prefill=False):
    return q.new_empty(q.shape)
