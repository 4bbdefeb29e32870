"""Rollout-engine benchmarks against HF `generate` (plain and static cache) on the same inputs.

(a) 512 prompts x 256 sampled tokens, (b) batch-1 decode latency, (c) GRPO-shaped rollouts, 32 prompts
x G=16 x 256 tokens, with and without shared group prompts; plus the bf16 greedy check against HF
(a differing token allowed only where HF's top two logits are within 1e-3). Every sequence generates
exactly the requested tokens on every side (ignore_eos / min_new_tokens).

GPU:   python bench/rollout.py --model default --out $OUT/rollout.json
CPU smoke test (tiny sizes):   python bench/rollout.py --model default --quick
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from r1kit.models import load_model
from r1kit.prompts import build_prompt
from r1kit.rollout import HFGenerator, SamplingParams
from r1kit.rollout.engine import EngineGenerator


def prompts(tokenizer, n: int) -> list[str]:
    """The prompts of ../shared/device/hf_baseline.py."""
    return [build_prompt(f"What is {i} + {2 * i + 7}? Explain.", tokenizer, "chat_plain") for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, object]:
    """Seconds of the second call (the first warms up and compiles)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def hf_generate(model, tokenizer, texts: list[str], new: int, static: bool):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    extra = {"cache_implementation": "static"} if static else {}
    return lambda: model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0,
                                  top_p=1.0, pad_token_id=tokenizer.pad_token_id, **extra)


def row(name: str, seconds: float, sequences: int, new: int) -> dict:
    return {"name": name, "s": round(seconds, 3), "tok_per_s": round(sequences * new / seconds, 1),
            "ms_per_step": round(1000 * seconds / new, 3)}


def greedy_check(model, tokenizer, engine: EngineGenerator, texts: list[str], new: int) -> dict:
    """Engine greedy tokens against HF greedy; where they part, HF's top-2 logit gap at that step."""
    ours = engine.generate(texts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    hf = HFGenerator(model, tokenizer, batch_size=len(texts))
    differing, close = 0, 0
    for text, completion in zip(texts, ours, strict=True):
        ids = torch.tensor([hf.encode(text)], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)
        ref = out.sequences[0, ids.shape[1]:].tolist()
        step = next((i for i, (a, b) in enumerate(zip(completion.token_ids, ref, strict=True)) if a != b), None)
        if step is not None:
            differing += 1
            top2 = out.logits[step][0].float().topk(2).values
            close += bool(top2[0] - top2[1] < 1e-3)
    return {"sequences": len(texts), "differing": differing, "differing_where_top2_within_1e-3": close}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke test")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype="auto")
    device = model.device
    big, new, groups, g = (8, 8, 2, 4) if args.quick else (512, 256, 32, 16)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "runs": []}
    engine = EngineGenerator(model, tokenizer, kv_cache_tokens=big * (new + 64), max_num_seqs=big)
    sampled = SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True, seed=0)

    texts = prompts(tokenizer, big)
    for static in (False, True):
        seconds, _ = timed(hf_generate(model, tokenizer, texts, new, static), device)
        results["runs"].append(row(f"(a) HF generate{' static' if static else ''} {big}x{new}", seconds, big, new))
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    seconds, _ = timed(lambda: engine.generate(texts, sampled), device)
    results["runs"].append(row(f"(a) r1kit engine {big}x{new}", seconds, big, new))
    if device.type == "cuda":
        results["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30

    for static in (False, True):
        seconds, _ = timed(hf_generate(model, tokenizer, texts[:1], new, static), device)
        results["runs"].append(row(f"(b) HF generate{' static' if static else ''} batch 1", seconds, 1, new))
    seconds, _ = timed(lambda: engine.generate(texts[:1], sampled), device)
    results["runs"].append(row("(b) r1kit engine batch 1", seconds, 1, new))

    group = SamplingParams(n=g, temperature=1.0, max_tokens=new, ignore_eos=True, seed=0)
    for shared in (True, False):
        engine.engine.share_prompts = shared
        seconds, _ = timed(lambda: engine.generate(texts[:groups], group), device)
        results["runs"].append(row(f"(c) r1kit engine {groups}x G={g}, shared prompts {shared}", seconds,
                                   groups * g, new))
    engine.engine.share_prompts = True
    results["greedy_check"] = greedy_check(model, tokenizer, engine, texts[: min(big, 64)], min(new, 128))

    for r in results["runs"]:
        print(f"{r['name']:<52} {r['tok_per_s']:>10.0f} tok/s {r['ms_per_step']:>8.2f} ms/step")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
