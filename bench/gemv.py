"""Projections of a few rows (small decode batches): cuBLAS against the engine's Triton kernel, and the card's read
bandwidth, the ceiling for both.

Each projection runs as a decode step runs it: inside a CUDA graph, call after call, each call on another copy of
the weight so that the copies outgrow the L2 cache and every call reads its weight from HBM. For the gate/up
projection cuBLAS is followed by the SwiGLU activation (silu(gate) * up, one fused kernel as torch.compile
makes it), which the Triton kernel does in its epilogue (`pair`). Tile sizes are swept; the engine's choice is
the `chosen` row.

  python bench/gemv.py --shape default 7b 32b --out $OUT/gemv.json
  python bench/gemv.py --shape default 7b --sweep --out $OUT/gemv_sweep.json   # session 18's tile sweep
  python bench/gemv.py --shape tiny --device cpu      # the CPU check (reference path only, no timings)
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import torch.nn.functional as F
from bench_io import save_json
from big_checkpoint import SHAPES
from rollout import graph_us

from r1kit.rollout.engine.gemv import kernel_supports, project_reference, project_triton, tiles

SHAPES = {**SHAPES, "default": (576, 1536, 30, 9, 3, 1e5, 1e-5)}  # SmolLM2-135M
L2_BYTES = 256 * 2**20  # copies of a weight until they outgrow this: every call reads HBM
SWIGLU = torch.compile(lambda y: F.silu(y[:, : y.shape[1] // 2]) * y[:, y.shape[1] // 2:], dynamic=True)


def projections(shape: str) -> dict[str, tuple[int, int, bool]]:
    """(out, in, pair) of each projection of a decode layer, q/k/v and gate/up fused as the engine runs them."""
    hidden, intermediate, _, heads, kv_heads, _, _ = SHAPES[shape]
    head_dim = hidden // heads
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden, False), "o": (hidden, hidden, False),
            "gate_up": (2 * intermediate, hidden, True), "down": (hidden, intermediate, False)}


def call(x: torch.Tensor, w: torch.Tensor, pair: bool, way: tuple[int, int, int] | None):
    """One projection as a function of nothing: cuBLAS (way None: F.linear, then for a pair the SwiGLU compiled
    as the engine's layers compile it) or the Triton kernel with (block_n, block_k, warps); (0, 0, 0): its
    chosen tiles."""
    if way is not None:
        return partial(project_triton, x, w, None, pair, *way)
    if not pair:
        return partial(F.linear, x, w)
    return lambda: SWIGLU(F.linear(x, w))


def measure(shape: str, device: torch.device, rows: list[int], sweep: bool) -> list[dict]:
    """Every projection of the shape at each row count: cuBLAS, the chosen Triton tiles, and (sweep) others."""
    out = []
    ways = {"cublas": None, "chosen": (0, 0, 0)}
    if sweep:
        grid = itertools.product((2, 4, 8), (256, 512, 1024, 2048), (2, 4, 8))
        ways |= {f"n{n}_k{k}_w{w}": (n, k, w) for n, k, w in grid}
    for name, (n, k, pair) in projections(shape).items():
        copies = max(2, -(-L2_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02 for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            expected = project_reference(x, weights[0], None, pair).float()
            got = project_triton(x, weights[0], None, pair).float()
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            timings = {way: graph_us([call(x, weights[i % copies], pair, tiles_)
                                      for i in range(max(copies, 32))], device) for way, tiles_ in ways.items()}
            for way, us in timings.items():
                out.append({"shape": shape, "matmul": name, "rows": m, "way": way, "us": round(us, 2),
                            "tb_s": round(n * k * 2 / us / 1e6, 3), "rel_error": error})
            best = min(timings, key=timings.get)
            print(f"{shape} {name} ({n}x{k}) rows {m}: cublas {timings['cublas']:.2f} us; chosen "
                  f"{tiles(k)} {timings['chosen']:.2f} us; best {best} {timings[best]:.2f} us "
                  f"({n * k * 2 / timings[best] / 1e6:.2f} TB/s); rel err {error:.1e}", flush=True)
        del weights
    return out


def read_tb_s(device: torch.device, gb: float = 4.0) -> float:
    """The card's bandwidth as a read-only pass (a sum over gb of bf16) sees it, in TB/s. (A copy captured in a
    graph measured 2.7-2.8 TB/s, read and write, on the H200 against 4.1-4.2 outside one: left out.)"""
    src = torch.empty(int(gb * 1e9) // 2, dtype=torch.bfloat16, device=device).normal_()
    return round(src.numel() * 2 / graph_us([src.sum], device, 10) / 1e6, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["default", "7b", "32b"])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 4], help="the decode buckets the kernel runs")
    parser.add_argument("--sweep", action="store_true", help="time other tile sizes too")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":  # the CPU check: the reference path and the kernel's support rule
        x, w = torch.randn(2, 64), torch.randn(128, 64)
        print("reference", tuple(project_reference(x, w, None, True).shape), "kernel runs:", kernel_supports(x, w))
        return
    report = {"device": torch.cuda.get_device_name(), "read_tb_s": read_tb_s(device), "projections": []}
    print("read bandwidth", report["read_tb_s"], "TB/s", flush=True)
    for shape in args.shape:
        report["projections"] += measure(shape, device, args.rows, args.sweep)
        save_json(report, args.out)


if __name__ == "__main__":
    main()
