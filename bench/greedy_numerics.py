"""The bf16 greedy check against HF under two inductor settings: as compiled by default, and with
`emulate_precision_casts` (fused pointwise ops round each intermediate as eager PyTorch does).

GPU:   python bench/greedy_numerics.py --out $OUT/greedy_numerics.json
"""

from __future__ import annotations

import argparse

import torch
import torch._inductor.config as inductor_config
from bench_io import save_json
from rollout import greedy_check, prompts

from r1kit.models import load_model
from r1kit.rollout.engine import EngineGenerator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype="auto")
    texts = prompts(tokenizer, 16)
    results = {}
    for emulate in (False, True):
        inductor_config.emulate_precision_casts = emulate
        torch._dynamo.reset()
        engine = EngineGenerator(model, tokenizer, kv_cache_tokens=16 * 256, max_num_seqs=16)
        results[f"emulate_precision_casts={emulate}"] = greedy_check(model, tokenizer, engine, texts, 64)
        print(results, flush=True)
    save_json(results, args.out)


if __name__ == "__main__":
    main()
