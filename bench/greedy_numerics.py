"""How often greedy bf16 decoding parts from HF `generate` fed one prompt at a time, and at which top-2 logit
gaps: the engine's batch; the engine under inductor's `emulate_precision_casts` (fused pointwise ops round each
intermediate as eager PyTorch does); and HF `generate` itself on the same prompts as one left-padded batch,
plain and with its static cache (different shapes for the same matmuls, nothing else changed).

GPU:   python bench/greedy_numerics.py --out $OUT/greedy_numerics.json
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch._inductor.config as inductor_config
from bench_io import save_json
from rollout import engine_greedy, greedy_check, hf_greedy, hf_references, prompts

from r1kit.models import load_model
from r1kit.rollout.engine import EngineGenerator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype="auto")
    texts = prompts(tokenizer, args.sequences)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "dtype": str(model.dtype)}
    # one set of references and one fp32 copy for every check: they depend on the prompts only
    references, fp32 = hf_references(model, tokenizer, texts, args.tokens), copy.deepcopy(model).float()

    def check(name: str, candidates: list[list[int]]) -> None:
        results[name] = greedy_check(fp32, candidates, references, args.tokens)
        print(name, results[name], flush=True)
        save_json(results, args.out)

    check("HF generate, one left-padded batch", hf_greedy(model, tokenizer, texts, args.tokens))
    check("HF generate static cache, one left-padded batch", hf_greedy(model, tokenizer, texts, args.tokens, True))
    for emulate in (False, True):
        inductor_config.emulate_precision_casts = emulate
        torch._dynamo.reset()
        engine = EngineGenerator(model, tokenizer, kv_cache_tokens=args.sequences * 256, max_num_seqs=args.sequences)
        check(f"r1kit engine, emulate_precision_casts={emulate}", engine_greedy(engine, texts, args.tokens))


if __name__ == "__main__":
    main()
