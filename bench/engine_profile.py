"""Where the embedded model's prefill and decode steps spend their time, at a server's and an eval's shapes.

- check: greedy tokens with prefills as CUDA graphs (PrefillStep) against the packed prefill forward, and the
  first token's logits of both;
- prefill: ms of one engine.step() that prefills, nothing running, for each shape (a server's arrivals: 10 chat
  prompts; an eval's admission: 18 GSM8K prompts x 4 samples, one prefill each; one prompt of 500 and of 2,000
  tokens) and each way (packed eager, packed compiled as a server runs it, graphed), median of 5;
- profile: the eval shape's packed eager prefill under torch.profiler, the top ops by host and by device time;
- filter: top-p over 512 rows of the vocabulary, the sort against the Triton thresholds;
- decode: ms of a decode step of 512 running sequences (contexts of ~350-550 tokens) with top-p (an eval's T=0.6,
  top-p 0.95) through each filter and without one, the layers eager (eval's default) and compiled.

  python bench/engine_profile.py --data $R1_DEVICE_DATA/gsm8k_test.jsonl --out $OUT/engine_profile.json
  python bench/engine_profile.py --device cpu --quick            # the CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_io import emit

from r1kit.models import load_model
from r1kit.prompts import build_prompt
from r1kit.rollout import SamplingParams, sampler
from r1kit.rollout.engine import LLMEngine
from r1kit.rollout.thresholds import kernel_filters


def questions(path: str | None, n: int) -> list[str]:
    """The first n GSM8K questions of the JSONL file, or made-up ones of similar length."""
    if path is None:
        return [f"Tom has {i} apples and buys {3 * i + 2} more bags of {i % 7 + 2} apples each. He gives away half "
                "of them to his friends at school and eats two. How many apples does Tom have now?"
                for i in range(n)]
    with open(path) as f:
        return [json.loads(line)["problem"] for line, _ in zip(f, range(n), strict=False)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefill_ms(llm: LLMEngine, prompts: list[list[int]], params: SamplingParams, repeats: int) -> float:
    """Median ms of a step that prefills these prompts with nothing running (the first two runs warm up)."""
    times = []
    for _ in range(repeats + 2):
        requests = [llm.add_request(ids, params) for ids in prompts]
        sync(llm.device)
        started = time.perf_counter()
        llm.step()
        sync(llm.device)
        times.append(1000 * (time.perf_counter() - started))
        assert llm.last_step == "prefill" and not llm.scheduler.waiting
        for request in requests:
            llm.abort(request)
    return round(statistics.median(times[2:]), 3)


def greedy(llm: LLMEngine, prompts: list[list[int]], new: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens of each prompt, and the logits of the first token (of one prefill of them all)."""
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    requests = [llm.add_request(ids, params) for ids in prompts]
    captured = {}
    first_tokens = llm._first_tokens

    def keep(seqs, logits):
        captured.setdefault("logits", logits.float().cpu())
        return first_tokens(seqs, logits)

    llm._first_tokens = keep
    while llm.has_work():
        llm.step()
    llm._first_tokens = first_tokens
    return [r.sequences[0].output_ids for r in requests], captured["logits"]


@torch.no_grad()
def reference_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """HF's forward in fp32 (a copy of the model): each prompt's last logits, one prompt at a time."""
    import copy

    fp32 = copy.deepcopy(model).float()
    logits = [fp32(torch.tensor([ids], device=fp32.device)).logits[0, -1].cpu() for ids in prompts]
    del fp32
    return torch.stack(logits)


def check(model, tokenizer, prompts: list[list[int]], new: int) -> dict:
    """The graphed prefill against the packed one, both in the model's dtype: the same greedy tokens?, and each
    one's first logits against HF's fp32 forward (the error each path's roundings leave)."""
    packed, logits = greedy(LLMEngine(model, tokenizer, compile=False, graph_prefill_tokens=0), prompts, new)
    graphed, graph_logits = greedy(LLMEngine(model, tokenizer, compile=False), prompts, new)
    reference = reference_logits(model, prompts)

    def against_reference(ours: torch.Tensor) -> dict:
        return {"max_abs_diff": round(float((ours - reference).abs().max()), 4),
                "mean_abs_diff": round(float((ours - reference).abs().mean()), 5),
                "same_argmax": int((ours.argmax(-1) == reference.argmax(-1)).sum())}

    same = sum(a == b for a, b in zip(packed, graphed, strict=True))
    return {"prompts": len(prompts), "tokens": new, "same_greedy_sequences": same,
            "packed_vs_graphed_max_abs_diff": round(float((logits - graph_logits).abs().max()), 4),
            "packed_vs_fp32": against_reference(logits), "graphed_vs_fp32": against_reference(graph_logits),
            "logits_max": round(float(reference.abs().max()), 3)}


def profile(llm: LLMEngine, prompts: list[list[int]], params: SamplingParams, top: int = 12) -> dict:
    """One prefill step under torch.profiler: the ops that took the most host time and device time."""
    from torch.profiler import ProfilerActivity, profile

    prefill_ms(llm, prompts, params, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if llm.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        prefill_ms(llm, prompts, params, 1)
    events = prof.key_averages()

    def ranked(key) -> list[dict]:
        rows = sorted(events, key=key, reverse=True)[:top]
        return [{"op": e.key[:80], "calls": e.count, "host_ms": round(e.cpu_time_total / 1000, 2),
                 "self_host_ms": round(e.self_cpu_time_total / 1000, 2),
                 "device_ms": round(e.self_device_time_total / 1000, 2)} for e in rows]

    return {"note": "three prefill steps (two warm-up) under the profiler",
            "by_self_host": ranked(lambda e: e.self_cpu_time_total),
            "by_device": ranked(lambda e: e.self_device_time_total)}


def filter_ms(vocab: int, device: torch.device, rows: int = 512, repeats: int = 20) -> dict:
    """ms of top-p 0.95 over (rows, vocab) scores like a T=0.6 step's: the sort (filter_logits) against the Triton
    thresholds (threshold_filter), and whether they keep the same tokens."""
    from r1kit.rollout.sampler import filter_logits
    from r1kit.rollout.thresholds import kernel_filters, threshold_filter

    scores = torch.randn(rows, vocab, device=device) * 4 / 0.6
    top_k = torch.zeros(rows, dtype=torch.long, device=device)
    top_p = torch.full((rows,), 0.95, device=device)
    min_p = torch.zeros(rows, device=device)
    ways = {"sort": filter_logits} | ({"thresholds": threshold_filter} if kernel_filters(scores) else {})
    result = {}
    for name, way in ways.items():
        way(scores, top_k, top_p, min_p)
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            out = way(scores, top_k, top_p, min_p)
        sync(device)
        result[f"{name}_ms"] = round(1000 * (time.perf_counter() - started) / repeats, 3)
        result[f"{name}_kept"] = int((~out.isinf()).sum())
    return result


def decode_ms(llm: LLMEngine, prompts: list[list[int]], params: SamplingParams, steps: int) -> float:
    """Mean ms of a decode step of these sequences after `steps` warm-up steps."""
    requests = [llm.add_request(ids, params) for ids in prompts]
    while llm.scheduler.waiting or llm.scheduler.prefilling or llm.last_step != "decode":
        llm.step()
    for _ in range(steps):
        llm.step()
    sync(llm.device)
    started = time.perf_counter()
    for _ in range(steps):
        llm.step()
    sync(llm.device)
    elapsed = 1000 * (time.perf_counter() - started) / steps
    for request in requests:
        llm.abort(request)
    llm.step()  # drops the step run ahead
    return round(elapsed, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", help="GSM8K test JSONL (made-up questions without it)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, args.device)
    quick = args.quick

    def encode(texts: list[str], template: str = "auto") -> list[list[int]]:
        return [tokenizer.encode(build_prompt(t, tokenizer, template), add_special_tokens=False) for t in texts]

    gsm8k = encode(questions(args.data, 64 if quick else 512))
    chat = encode([f"Write a haiku about the number {i}." for i in range(10)], "chat_plain")
    filler = tokenizer.encode(" ".join(questions(None, 40)), add_special_tokens=False)
    shapes = {"serve_10_chat": (chat, SamplingParams(max_tokens=256)),
              "eval_18x4": (gsm8k[:18], SamplingParams(n=4, temperature=0.6, top_p=0.95, max_tokens=512)),
              "one_500": ([filler[:500]], SamplingParams(max_tokens=64)),
              "one_2000": ([(filler * 2)[:2000]], SamplingParams(max_tokens=64))}
    result: dict = {"device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
                    "check": check(model, tokenizer, gsm8k[:16], 8 if quick else 64)}
    ways = {"packed_eager": {"compile": False, "graph_prefill_tokens": 0},
            "packed_compiled": {"compile": True, "compile_prefill": True, "graph_prefill_tokens": 0},
            "graphed": {"compile": False}}
    repeats = 2 if quick else 5
    result["prefill_ms"] = {}
    for way, options in ways.items():
        llm = LLMEngine(model, tokenizer, **options)
        result["prefill_ms"][way] = {name: prefill_ms(llm, prompts, params, repeats)
                                     for name, (prompts, params) in shapes.items()}
        if way == "packed_eager":
            result["profile_eval_18x4_packed_eager"] = profile(llm, *shapes["eval_18x4"])
        print(way, result["prefill_ms"][way], flush=True)
    result["filter_ms"] = filter_ms(model.get_output_embeddings().weight.shape[0], model.device)
    print("filter", result["filter_ms"], flush=True)
    result["decode_ms_512"] = {}
    rows = gsm8k[: 32 if quick else 512]
    top_p = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=1024, ignore_eos=True)
    runs = {"top_p_0.95": (top_p, True), "top_p_0.95_sort": (top_p, False),
            "no_filter": (SamplingParams(temperature=0.6, max_tokens=1024, ignore_eos=True), True)}
    for compiled in (False, True):
        llm = LLMEngine(model, tokenizer, compile=compiled, kv_cache_tokens=len(rows) * 1280)
        for name, (params, thresholds) in runs.items():
            key = f"{'compiled' if compiled else 'eager'}_{name}"
            sampler.kernel_filters = kernel_filters if thresholds else (lambda scores: False)
            llm.decode_step.graphs.clear()  # captured again with this filter
            result["decode_ms_512"][key] = decode_ms(llm, rows, params, 5 if quick else 200)
            print(key, result["decode_ms_512"][key], flush=True)
        sampler.kernel_filters = kernel_filters
    emit(result, args.out)


if __name__ == "__main__":
    main()
