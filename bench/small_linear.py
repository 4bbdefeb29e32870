"""Microseconds per call of the fused small-batch linear kernel (`r1kit/rollout/engine/small_linear.py`) at
the embedded model's four layer shapes, per launch configuration, replayed from a CUDA graph as a decode
step replays it: which configuration to ship, and whether it beats the unfused layer (cuBLAS matmuls and
the compiled norm/activation kernels: ~20.7 us a layer at batch 1 on the H200, `bench/rollout.py`'s
kernel profile).

GPU:   python bench/small_linear.py --out $OUT/small_linear.json
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from bench_io import save_json

from r1kit.rollout.engine.small_linear import SMALL_ROWS, _norm_linear_kernel

HIDDEN, INTERMEDIATE, QKV = 576, 1536, 960  # SmolLM2-135M


def launcher(rows: int, k: int, n: int, norm: bool, residual: bool, add: bool, gated: bool, config: dict):
    """A call of the kernel on random bf16 inputs of this shape, with this configuration."""
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    x, res, weight = rand(rows, k), rand(rows, k), rand(2 * n if gated else n, k)
    norm_w, add_to, out, stream = rand(k), rand(rows, n), rand(rows, n), rand(rows, k)

    def call() -> None:
        _norm_linear_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
            x, res, stream, norm_w, weight, x, add_to, out, rows, n, k, 1e-5, k, k, k, k, n, n, HAS_RES=residual,
            HAS_NORM=norm, HAS_BIAS=False, HAS_ADD=add, GATED=gated, ROWS=SMALL_ROWS, **config)

    return call


def micros(call, repeats: int = 50) -> float:
    """Microseconds per call, `repeats` calls captured in one CUDA graph and replayed."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (10 * repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    layers = {"qkv": (HIDDEN, QKV, True, True, False, False), "o": (HIDDEN, HIDDEN, False, False, True, False),
              "gate_up": (HIDDEN, INTERMEDIATE, True, False, False, True),
              "down": (INTERMEDIATE, HIDDEN, False, False, False, False)}
    results = []
    for block_n, block_k, warps, stages in itertools.product((16, 32), (64, 128, 256), (1, 2, 4), (1, 2, 3)):
        config = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}
        try:
            times = {name: round(micros(launcher(args.rows, *shape, config)), 2) for name, shape in layers.items()}
        except Exception as error:  # a configuration that does not compile on this card
            print(config, repr(error)[:200])
            continue
        results.append({**config, **times, "layer_us": round(sum(times.values()), 2)})
        print(results[-1], flush=True)
    results.sort(key=lambda r: r["layer_us"])
    print("best:", results[:5])
    save_json({"rows": args.rows, "configs": results}, args.out)


if __name__ == "__main__":
    main()
