"""A projection of a few rows (a small decode batch) as one pass over the weight: `project(x, w, bias, pair)`.

At a few rows a projection reads its weight once and does almost no arithmetic. Through the embedded model's
weights (0.7-3.5 MB) that is latency more than bandwidth: cuBLAS took 3.6-5.7 us a call at 2 rows on the
H200, the SwiGLU after the gate/up one another kernel. The Triton kernel here gives each program two output
columns and reads their weight rows whole, in one step along the reduction, the few input rows staying in
cache: 2.4-4.0 us. With `pair` the weight is a gate and an up projection stacked ([gate; up], as the engine
fuses them) and the kernel returns silu(gate) * up, so the activation costs no kernel of its own and its
input is never written. Through a 7B model's weights cuBLAS streams at 2.3-4.0 TB/s and the kernel was no
faster, so it runs only for small weights (`small`).

Registered as a custom op so that a compiled decode layer keeps it whole; the PyTorch reference runs where
the kernel does not (CPU, fp32, more rows, large weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the reference path serves
    triton = None

GEMV_ROWS = 4  # the largest batch the kernel runs (the decode buckets of 2 and 4 rows)
# The largest weight it runs, and its longest row: on the H200 it beat cuBLAS at every projection of the
# embedded model (up to 3,072 x 576: 4.0 us against 5.7 at 2 rows, the SwiGLU included), and at the 7B and
# 32B shapes (from 3,584 x 3,584 up, rows longer than one tile) it tied or was up to 1.3x slower.
GEMV_WEIGHT, GEMV_K = 2**21, 2048


def project_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, pair: bool) -> torch.Tensor:
    """x @ w.T + bias; with `pair`, silu(gate) * up of its two halves, rounded as the unfused layer rounds."""
    y = F.linear(x, w, bias)
    if not pair:
        return y
    gate, up = y.chunk(2, -1)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, rows, n_out, k_dim, stride_x, stride_w, stride_y,
                     HAS_BIAS: tl.constexpr, PAIR: tl.constexpr, ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """BLOCK_N output columns of every row: each weight row read once, whole, in BLOCK_K-wide steps."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r, k = tl.arange(0, ROWS_PAD), tl.arange(0, BLOCK_K)
        col_ok, row_ok = cols < n_out, r < rows
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
        up_rows = w_rows + n_out.to(tl.int64) * stride_w  # the up half's rows, read only with PAIR
        acc = tl.zeros((ROWS_PAD, BLOCK_N), tl.float32)
        acc_up = tl.zeros((ROWS_PAD, BLOCK_N), tl.float32)
        for start in range(0, k_dim, BLOCK_K):
            kk = start + k
            k_ok = kk < k_dim
            x = tl.load(x_ptr + r[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            x = x.to(tl.float32)[:, None, :]
            w_ok = col_ok[:, None] & k_ok[None, :]
            w = tl.load(w_rows + kk[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first")
            acc += tl.sum(x * w.to(tl.float32)[None, :, :], 2)
            if PAIR:
                u = tl.load(up_rows + kk[None, :], mask=w_ok, other=0.0, eviction_policy="evict_first")
                acc_up += tl.sum(x * u.to(tl.float32)[None, :, :], 2)
        out_ty = y_ptr.dtype.element_ty
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if PAIR:
                acc_up += tl.load(bias_ptr + n_out + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if PAIR:  # each half rounded to the output dtype first, as the matmul's output would be
            gate, up = acc.to(out_ty).to(tl.float32), acc_up.to(out_ty).to(tl.float32)
            acc = (gate * tl.sigmoid(gate)).to(out_ty).to(tl.float32) * up
        tl.store(y_ptr + r[:, None] * stride_y + cols[None, :], acc.to(out_ty), mask=row_ok[:, None] & col_ok[None, :])


def projects_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel runs on this device and dtype: triton, a GPU, 16-bit floats."""
    return triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def small(rows: int, w: torch.Tensor) -> bool:
    """Whether a projection of this many rows through w is one the kernel is the faster way for."""
    return rows <= GEMV_ROWS and w.numel() <= GEMV_WEIGHT and w.shape[-1] <= GEMV_K


def kernel_supports(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Triton kernel runs this projection: its device and dtype, a small one, rows and weight rows
    contiguous."""
    return (projects_on(x.device, x.dtype) and w.dtype == x.dtype and x.dim() == 2 and small(x.shape[0], w)
            and x.stride(-1) == 1 and w.stride(-1) == 1)


def tiles(k_dim: int) -> tuple[int, int, int]:
    """(output columns a program, reduction step, warps): two columns, the whole reduction in one step, two
    warps, the fastest of bench/gemv.py's sweep at every projection of the embedded model."""
    return 2, min(GEMV_K, triton.next_power_of_2(k_dim)), 2


def project_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, pair: bool, block_n: int = 0,
                   block_k: int = 0, warps: int = 0) -> torch.Tensor:
    """The same contract as project_reference, computed by the Triton kernel (tile sizes for benchmarks)."""
    rows, k_dim = x.shape
    n_out = w.shape[0] // 2 if pair else w.shape[0]
    y = x.new_empty(rows, n_out)
    chosen = tiles(k_dim)
    block_n, block_k, warps = block_n or chosen[0], block_k or chosen[1], warps or chosen[2]
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, w, bias if bias is not None else w, y, rows, n_out, k_dim, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, PAIR=pair, ROWS_PAD=max(2, triton.next_power_of_2(rows)), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps)
    return y


@torch.library.custom_op("r1kit::project", mutates_args=())
def project(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, pair: bool = False) -> torch.Tensor:
    """x @ w.T (+ bias) for (rows, in) x and (out, in) w; with `pair`, silu(gate) * up of w = [gate; up]."""
    fast = kernel_supports(x, w) and (bias is None or bias.is_contiguous())
    return (project_triton if fast else project_reference)(x, w, bias, pair)


@project.register_fake
def _(x, w, bias=None, pair=False):
    return x.new_empty(x.shape[0], w.shape[0] // 2 if pair else w.shape[0])
