"""The decode attention kernel's context tile and warps, timed as the engine runs it: 30 launches (one a
layer) captured in a CUDA graph, a model's head shapes (SmolLM2-135M's: 9 query heads, 3 KV heads, head_dim
64; or R1-Distill-Qwen-7B's 28/4/128 and -32B's 40/8/128), a paged cache of 16-token blocks, at small and large
batches and short and long contexts. Which tile to use for which batch: a small batch is a few programs a
sequence, each walking its context tile by tile alone.

GPU:   python bench/attention_tiles.py [--heads 7b] --out $OUT/attention_tiles.json
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import triton
from bench_io import save_json
from rollout import graph_us

from r1kit.rollout.engine.attention import _paged_decode_kernel

BLOCK, LAYERS = 16, 30
HEAD_SHAPES = {"135m": (9, 3, 64), "7b": (28, 4, 128), "32b": (40, 8, 128)}  # query heads, KV heads, head_dim


def case(batch: int, context: int, heads: tuple[int, int, int], device: torch.device) -> dict:
    """Random q/k/v, rotary tables and a cache whose blocks are shuffled, for `batch` sequences of `context`."""
    HEADS, KV_HEADS, HEAD_DIM = heads  # noqa: N806 - the kernel's names
    blocks_each = -(-context // BLOCK)
    order = torch.randperm(batch * blocks_each, device=device, dtype=torch.int32)
    cache = (batch * blocks_each + 1) * BLOCK
    t = {"q": torch.randn(batch, HEADS, HEAD_DIM), "k": torch.randn(batch, KV_HEADS, HEAD_DIM),
         "v": torch.randn(batch, KV_HEADS, HEAD_DIM), "cos": torch.randn(batch, HEAD_DIM),
         "sin": torch.randn(batch, HEAD_DIM), "k_cache": torch.randn(cache, KV_HEADS, HEAD_DIM),
         "v_cache": torch.randn(cache, KV_HEADS, HEAD_DIM)}
    t = {name: x.to(device, torch.bfloat16) for name, x in t.items()}
    t["tables"] = order.view(batch, blocks_each)
    t["lens"] = torch.full((batch,), context, dtype=torch.int32, device=device)
    t["slots"] = t["tables"][:, -1].long() * BLOCK + (context - 1) % BLOCK
    t["out"] = torch.empty_like(t["q"])
    return t


def launch(t: dict, tile: int, warps: int) -> None:
    q, k, v, k_cache, out = t["q"], t["k"], t["v"], t["k_cache"], t["out"]
    HEADS, KV_HEADS, HEAD_DIM = q.shape[1], k.shape[1], q.shape[2]  # noqa: N806 - the kernel's names
    group = HEADS // KV_HEADS
    _paged_decode_kernel[(q.shape[0], KV_HEADS)](
        q, k, v, t["cos"], t["sin"], t["slots"], k_cache, t["v_cache"], t["tables"], t["lens"], out,
        HEAD_DIM**-0.5, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        t["cos"].stride(0), k_cache.stride(0), k_cache.stride(1), t["tables"].stride(0), out.stride(0),
        out.stride(1), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=HEAD_DIM,
        BLOCK_SIZE=BLOCK, TILE=tile, num_warps=warps)


def us_per_launch(t: dict, tile: int, warps: int, replays: int = 50) -> float:
    """Microseconds per launch, from a graph of LAYERS launches replayed `replays` times."""
    return round(graph_us([partial(launch, t, tile, warps)] * LAYERS, torch.device("cuda"), replays), 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", choices=sorted(HEAD_SHAPES), default="135m", help="whose head shapes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8, 64, 512])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(), "heads": HEAD_SHAPES[args.heads], "us_per_launch": []}
    for batch, context in itertools.product(args.batches, (48, 160, 300)):
        t = case(batch, context, HEAD_SHAPES[args.heads], device)
        for tile, warps in itertools.product((32, 64, 128, 256), (2, 4, 8)):
            row = {"batch": batch, "context": context, "tile": tile, "warps": warps}
            try:
                row["us"] = us_per_launch(t, tile, warps)
            except Exception as error:  # a configuration that does not fit (registers, shared memory)
                row["error"] = repr(error)[:200]
            results["us_per_launch"].append(row)
            print(row, flush=True)
        save_json(results, args.out)


if __name__ == "__main__":
    main()
