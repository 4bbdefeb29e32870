"""The linear layers of a decode step at small batch, fused with the norm and activation around them.

At batch 1 a decode step is ~280 kernels of 1-5 us, each bound by its latency rather than by the bytes it
moves, so a layer's RMSNorms, SiLU gating and residual copies cost about as much as its matmuls. For up
to SMALL_ROWS rows one kernel computes

    stream = x + residual               (when a residual is given; returned for the layer's later add)
    h      = rms_norm(stream) * norm    (when a norm weight is given)
    y      = h @ weight.T + bias        (gated: silu(h @ gate.T) * (h @ up.T), gate and up one buffer)
    out    = add_to + y                 (when given: the o projection's residual add)

rounding where the unfused PyTorch ops round, so its values are theirs up to the order of the matmul's
sums. Each program owns BLOCK_N output columns and reads their weight rows once; the norm's pass over x
costs little (x is a few KB, in cache). `norm_linear_reference` is the same contract in PyTorch: the
CPU's path, and the kernel's check in Triton's interpreter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the reference path serves
    triton = None

SMALL_ROWS = 16  # the most rows the kernel takes: tl.dot's smallest tile, so more rows cost nothing extra
BLOCK_N, BLOCK_K = 16, 128


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as HF's Llama does."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def norm_linear_reference(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                          norm: torch.Tensor | None, bias: torch.Tensor | None, add_to: torch.Tensor | None,
                          eps: float, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stream) as the module docstring says; stream is empty when no residual is given."""
    stream = x if residual is None else residual + x
    h = stream if norm is None else rms_norm(stream, norm, eps)
    if gated:
        gate, up = F.linear(h, weight).chunk(2, -1)
        y = F.silu(gate) * up
    else:
        y = F.linear(h, weight, bias)
    return y if add_to is None else add_to + y, stream if residual is not None else x.new_empty(0)


if triton is not None:

    @triton.jit
    def _stream(x_ptr, res_ptr, rows, ks, mask, stride_x, stride_r, HAS_RES: tl.constexpr):
        """A tile of x (+ the residual, the sum rounded as eager PyTorch rounds it)."""
        s = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + rows[:, None] * stride_r + ks[None, :], mask=mask, other=0.0)
            s = (s.to(tl.float32) + r.to(tl.float32)).to(s.dtype)
        return s

    @triton.jit
    def _norm_linear_kernel(x_ptr, res_ptr, stream_ptr, norm_ptr, w_ptr, bias_ptr, add_ptr, out_ptr, M, N, K, eps,
                            stride_x, stride_r, stride_s, stride_w, stride_a, stride_o, HAS_RES: tl.constexpr,
                            HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
                            GATED: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, ROWS)
        row_ok, col_ok = rows < M, cols < N
        written = rows < tl.where(tl.program_id(0) == 0, M, 0)  # the first program writes the stream out
        if HAS_NORM:  # a first pass for each row's mean square
            total = tl.zeros((ROWS,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                s = _stream(x_ptr, res_ptr, rows, ks, row_ok[:, None] & (ks < K)[None, :], stride_x, stride_r,
                            HAS_RES).to(tl.float32)
                total += tl.sum(s * s, 1)
            scale = tl.rsqrt(total / K + eps)
        acc = tl.zeros((ROWS, BLOCK_N), tl.float32)
        acc_up = tl.zeros((ROWS, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            tile = row_ok[:, None] & k_ok[None, :]
            h = _stream(x_ptr, res_ptr, rows, ks, tile, stride_x, stride_r, HAS_RES)
            if HAS_RES:
                tl.store(stream_ptr + rows[:, None] * stride_s + ks[None, :], h, mask=written[:, None] & k_ok[None, :])
            if HAS_NORM:
                h = (h.to(tl.float32) * scale[:, None]).to(h.dtype)
                weight = tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                h = (h.to(tl.float32) * weight[None, :]).to(h.dtype)
            w_tile = col_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=w_tile, other=0.0)
            acc += tl.dot(h, tl.trans(w))
            if GATED:  # the up rows sit N rows below the gate rows
                u = tl.load(w_ptr + (cols + N)[:, None] * stride_w + ks[None, :], mask=w_tile, other=0.0)
                acc_up += tl.dot(h, tl.trans(u))
        out_tile = row_ok[:, None] & col_ok[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_ADD:  # added before the one rounding, as cuBLAS's addmm does
            acc += tl.load(add_ptr + rows[:, None] * stride_a + cols[None, :], mask=out_tile, other=0.0).to(tl.float32)
        y = acc.to(out_ptr.dtype.element_ty)
        if GATED:
            gate = y.to(tl.float32)
            up = acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
            y = (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y, mask=out_tile)


def norm_linear_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel runs here: triton present, a GPU, 16-bit floats."""
    return triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def norm_linear_triton(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
                       norm: torch.Tensor | None, bias: torch.Tensor | None, add_to: torch.Tensor | None,
                       eps: float, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same contract as norm_linear_reference, computed by the Triton kernel, for up to SMALL_ROWS rows."""
    x, weight = x.contiguous(), weight.contiguous()
    rows, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    out = x.new_empty(rows, n)
    stream = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    residual = x if residual is None else residual.contiguous()  # absent tensors: any pointer, never read
    add_to = out if add_to is None else add_to.contiguous()
    _norm_linear_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, residual, stream, x if norm is None else norm, weight, x if bias is None else bias, add_to, out,
        rows, n, k, eps, x.stride(0), residual.stride(0), k, weight.stride(0), add_to.stride(0), out.stride(0),
        HAS_RES=stream.numel() > 0, HAS_NORM=norm is not None, HAS_BIAS=bias is not None,
        HAS_ADD=add_to is not out, GATED=gated, ROWS=SMALL_ROWS, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out, stream


@torch.library.custom_op("r1kit::norm_linear", mutates_args=())
def norm_linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, norm: torch.Tensor | None,
                bias: torch.Tensor | None, add_to: torch.Tensor | None, eps: float, gated: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stream) of up to SMALL_ROWS rows in one kernel where it runs, else through PyTorch."""
    fused = norm_linear_runs(x.device, x.dtype) and x.shape[0] <= SMALL_ROWS
    return (norm_linear_triton if fused else norm_linear_reference)(x, weight, residual, norm, bias, add_to, eps,
                                                                   gated)


@norm_linear.register_fake
def _(x, weight, residual, norm, bias, add_to, eps, gated):
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape if residual is not None else (0,))
