"""Rollout-engine benchmarks against HF `generate` (plain and static cache) on the same inputs. (a) 512 prompts x 256
sampled tokens, (b) batch-1 decode latency (per token of a whole generate, and per decoded token with the prefill
left out), each for the engine eager, with CUDA graphs, and with graphs + compiled layers; (c) GRPO-shaped rollouts,
32 prompts x G=16 x 256 tokens, with and without shared group prompts. Then: the engine's logprobs against the
trainer's forward; the bf16 greedy check against HF (a differing token allowed only where HF's top two logits are
within 1e-3; the top-2 gaps where they part, in HF's logits and an fp32 forward's); the fp32 greedy check; and one
decode step (its graph: forward and sampler; the forward alone; the sampler alone; the host) at 1, 64 and 512
sequences, and its GPU time by kernel; the phases of (a) (queueing, prefill, decode); the time to refresh a bf16
engine from an fp32 policy. Every sequence generates exactly the requested tokens on every side (ignore_eos /
min_new_tokens). Figures are saved as they come.

GPU:   python bench/rollout.py --model default --out $OUT/rollout.json
Smoke test (tiny sizes, engine only):   python bench/rollout.py --quick --skip-hf
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from functools import partial

import torch
from bench_io import save_json

from r1kit.models import load_model
from r1kit.prompts import build_prompt
from r1kit.rollout import SamplingParams
from r1kit.rollout.engine import EngineGenerator
from r1kit.rollout.types import encode_prompt, encode_prompts


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


def graph_us(calls, device: torch.device, replays: int = 20) -> float:
    """Microseconds a call, the calls (functions of nothing) captured in one CUDA graph and replayed: GPU time
    without launch costs, as inside a graphed step. The first three run outside the capture (compiling)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for call in calls[:3]:
            call()  # compile and tune outside the capture
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / replays / len(calls)


def ms_per_call(fn, device: torch.device, repeats: int) -> float:
    """Mean milliseconds of `repeats` back-to-back calls of fn, the device synchronized at both ends."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return 1000 * (time.perf_counter() - t0) / repeats


def hf_generate(model, tokenizer, texts: list[str], new: int, static: bool):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    extra = {"cache_implementation": "static"} if static else {}
    return lambda: model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0,
                                  top_p=1.0, pad_token_id=tokenizer.pad_token_id, **extra)


def per_token_ms(run, new: int, device: torch.device) -> float:
    """Milliseconds per decoded token past the first, at batch 1: (time for `new` tokens - time for one) /
    (new - 1), which leaves out what both pay once (tokenizing, prefill, the first token). run(n) returns a
    call that generates n tokens. A run of two tokens first, untimed: what a first use compiles or captures (a
    prefill graph, batch 1's decode graph) would otherwise count in the long run alone."""
    timed(run(2), device)
    all_tokens, _ = timed(run(new), device)
    one_token, _ = timed(run(1), device)
    return round(1000 * (all_tokens - one_token) / (new - 1), 3)


def row(name: str, seconds: float, sequences: int, new: int) -> dict:
    return {"name": name, "s": round(seconds, 3), "tok_per_s": round(sequences * new / seconds, 1),
            "ms_per_step": round(1000 * seconds / new, 3)}


def engine_greedy(engine: EngineGenerator, texts: list[str], new: int) -> list[list[int]]:
    """The engine's greedy tokens of each prompt, one batch, stopping at EOS."""
    return [c.token_ids for c in engine.generate(texts, SamplingParams(temperature=0, max_tokens=new))]


def hf_greedy(model, tokenizer, texts: list[str], new: int, static: bool = False) -> list[list[int]]:
    """HF generate's greedy tokens, all prompts in one left-padded batch, each cut after its first EOS."""
    prompts = encode_prompts(tokenizer, texts)
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    extra = {"cache_implementation": "static"} if static else {}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, **extra)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cut = []
    for tokens in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        cut.append(tokens[:end])
    return cut


def hf_references(model, tokenizer, texts: list[str], new: int) -> list[tuple]:
    """(prompt ids, HF generate output) of each prompt, greedy, one prompt at a time, stopping at EOS.

    Not ignore_eos / min_new_tokens: HF's min_new_tokens sets EOS logits to -inf, so wherever the model
    would end its answer HF takes the runner-up and the sequences part for a reason that is not numerics."""
    references = []
    for text in texts:
        ids = torch.tensor([encode_prompt(tokenizer, text)], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        references.append((ids, out))
    return references


def first_difference(ours: list[int], ref: list[int]) -> int | None:
    """The first step where two greedy sequences part (None if one is a prefix of the other: both stopped at
    an EOS, or one stopped at an end token the other's EOS list lacks)."""
    return next((i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), None)


def greedy_check(fp32, candidates: list[list[int]], references: list[tuple], new: int) -> dict:
    """Greedy tokens (the engine's, or another HF path's) against HF greedy one prompt at a time (`references`,
    from hf_references); where they part, the top-2 logit gap of HF at that step, and of the model in fp32
    (`fp32`) on the same prefix (is it a near-tie of the model itself?)."""
    differing, tied, gaps, fp32_gaps, compared = 0, 0, [], [], 0
    for ours, (ids, out) in zip(candidates, references, strict=True):
        ref = out.sequences[0, ids.shape[1]:].tolist()
        compared += min(len(ours), len(ref))
        step = first_difference(ours, ref)
        if step is None:
            continue
        differing += 1
        top2 = out.logits[step][0].float().topk(2).values
        gaps.append(round((top2[0] - top2[1]).item(), 4))
        tied += gaps[-1] < 1e-3
        with torch.no_grad():
            top2 = fp32(out.sequences[:, : ids.shape[1] + step]).logits[0, -1].topk(2).values
        fp32_gaps.append(round((top2[0] - top2[1]).item(), 4))
    return {"sequences": len(references), "max_tokens": new, "tokens_compared": compared, "differing": differing,
            "differing_where_top2_within_1e-3": tied, "hf_top2_gap_where_they_part": gaps,
            "fp32_top2_gap_where_they_part": fp32_gaps}


def fp32_greedy_check(fp32, tokenizer, texts: list[str], new: int) -> dict:
    """The engine in fp32 (its eager path) against HF generate in fp32: the model code, free of bf16 rounding."""
    engine = EngineGenerator(fp32, tokenizer, kv_cache_tokens=len(texts) * (new + 128), max_num_seqs=len(texts))
    same, compared = 0, 0
    ours_all = engine_greedy(engine, texts, new)
    for ours, (ids, out) in zip(ours_all, hf_references(fp32, tokenizer, texts, new), strict=True):
        ref = out.sequences[0, ids.shape[1]:].tolist()
        compared += min(len(ours), len(ref))
        same += first_difference(ours, ref) is None
    return {"sequences": len(texts), "max_tokens": new, "tokens_compared": compared, "identical": same}


def logprob_gap(model, fp32, engine_completions, prompt_ids: list[list[int]]) -> dict:
    """Engine logprobs against the trainer's forward on the same tokens: the model (its dtype) and its fp32
    copy under bf16 autocast, as `r1kit train` runs."""
    gaps = {}
    for name, policy in (("trainer_model_dtype", model), ("trainer_fp32_bf16_autocast", fp32)):
        diffs = []
        for c in engine_completions:
            ids = torch.tensor([prompt_ids[c.prompt_index] + c.token_ids], device=model.device)
            with torch.no_grad(), torch.autocast(model.device.type, torch.bfloat16, enabled=name.endswith("autocast")):
                logits = policy(ids).logits[0, len(prompt_ids[c.prompt_index]) - 1 : -1].float()
            ref = logits.log_softmax(-1).gather(-1, ids[0, -len(c.token_ids):, None]).squeeze(-1)
            diffs.append(torch.tensor(c.logprobs, device=model.device) - ref)
        d = torch.cat(diffs)
        gaps[name] = {"mean_abs": d.abs().mean().item(), "p99_abs": d.abs().quantile(0.99).item(),
                      "max_abs": d.abs().max().item(), "mean_ratio_minus_1": (d.exp() - 1).mean().item()}
    return gaps


def weight_sync_ms(model, tokenizer, repeats: int = 20) -> float:
    """Milliseconds to refresh a bf16 engine's buffers from an fp32 policy (one in-place copy of every weight
    into its preallocated buffer), which training does once per update."""
    policy = copy.deepcopy(model).float()
    engine = EngineGenerator(policy, tokenizer, kv_cache_tokens=256, max_num_seqs=1, dtype=torch.bfloat16,
                             cuda_graphs=False)
    engine.sync_weights()
    return round(ms_per_call(engine.sync_weights, policy.device, repeats), 3)


def decoding(engine: EngineGenerator, texts: list[str], max_tokens: int, steps: int):
    """The engine with one sequence per text prefilled and `steps` decode steps taken (its running set's
    tables, settings and keys uploaded): ready for a step to be measured."""
    llm = engine.engine
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    for text in texts:
        llm.add_request(engine.encode(text), params)
    while llm.scheduler.waiting:
        llm.step()
    for _ in range(steps):
        llm.step()
    return llm


def phases(engine: EngineGenerator, texts: list[str], params: SamplingParams) -> dict:
    """Where a whole generate() of the texts spends its wall time: tokenizing and queueing the prompts,
    prefill steps, decode steps (each step's wall time on the host, so a step run ahead counts once)."""
    llm = engine.engine
    sync(llm.device)
    t0 = time.perf_counter()
    for text in texts:
        llm.add_request(engine.encode(text), params)
    spent = {"queue": time.perf_counter() - t0}
    steps: dict[str, int] = {}
    while llm.has_work():
        t = time.perf_counter()
        llm.step()
        spent[llm.last_step] = spent.get(llm.last_step, 0.0) + time.perf_counter() - t
        steps[llm.last_step] = steps.get(llm.last_step, 0) + 1
    sync(llm.device)
    return {"sequences": len(texts), "total_s": round(time.perf_counter() - t0, 3),
            **{f"{kind}_s": round(s, 3) for kind, s in spent.items()}, **{f"{k}_steps": n for k, n in steps.items()}}


def decode_breakdown(engine: EngineGenerator, texts: list[str], repeats: int = 20) -> dict:
    """Milliseconds of one decode step of len(texts) sequences (the engine's step()), of the device's part of
    it (the step's graph: inputs, forward, sampler, state advanced), of the forward alone (its own graph)
    and of the sampler alone (launched eagerly, as it was before it joined the step's graph); the rest is the
    host loop (token append, finish checks), which overlaps the GPU while the next step runs ahead."""
    from r1kit.rollout.sampler import sample

    llm = decoding(engine, texts, 3 * repeats + 8, steps=3)
    per_call = partial(ms_per_call, device=llm.device, repeats=repeats)
    state, n = llm.decode_step, len(llm.scheduler.running)
    state.forward(n)  # captured on first use
    forward = per_call(lambda: state.forward(n))
    sampler = per_call(lambda: sample(state.logits[:n], state.sampling(n, False), state.keys[:n], state.steps[:n]))
    graph_step = per_call(lambda: state.step(n, False))
    llm._batch = None  # those steps ran the device's state ahead of the host's: the next step loads it again
    step = per_call(llm.step)
    while llm.has_work():
        llm.step()
    return {"sequences": n, "step_ms": round(step, 3), "graph_step_ms": round(graph_step, 3),
            "forward_ms": round(forward, 3), "sampler_alone_ms": round(sampler, 3),
            "host_and_rest_ms": round(step - graph_step, 3)}


def kernel_profile(engine: EngineGenerator, texts: list[str], top: int = 15) -> dict:
    """GPU time of one decode step of len(texts) sequences by kernel (forward and sampler, run without
    graphs so the profiler sees each kernel): where the step's device time goes."""
    from torch.profiler import ProfilerActivity, profile

    from r1kit.rollout.sampler import sample

    llm = decoding(engine, texts, 64, steps=32)  # a context of prompt + 32 tokens
    state, n = llm.decode_step, len(llm.scheduler.running)
    rows = state.rows(n)

    def one_step() -> None:  # as the step's graph runs it, but for the state's advance (a few tiny kernels)
        sample(llm.decoder.decode(*state.inputs(rows)), state.sampling(rows, False), state.keys[:rows],
               state.steps[:rows])

    one_step()
    sync(llm.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        one_step()
        sync(llm.device)
    while llm.has_work():
        llm.step()
    kernels = sorted(((e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                      if e.self_device_time_total > 0), key=lambda k: -k[1])
    total = sum(t for _, t, _ in kernels)
    return {"sequences": len(texts), "gpu_ms": round(total / 1000, 3),
            "kernels": [{"name": name[:90], "ms": round(t / 1000, 3), "share": round(t / total, 3), "calls": n}
                        for name, t, n in kernels[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--skip-hf", action="store_true", help="the engine's rows only")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype="auto")
    device = model.device
    big, new, groups, g = (8, 8, 2, 4) if args.quick else (512, 256, 32, 16)
    started = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "runs": []}
    sampled = SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True, seed=0)
    texts = prompts(tokenizer, big)
    decode_ms = results["batch1_ms_per_decoded_token"] = {}

    def save() -> None:  # after every figure, so a call cut off at its time limit keeps what it measured
        save_json(results, args.out)

    def measure(name: str, fn, sequences: int) -> None:
        try:
            seconds, _ = timed(fn, device)
            results["runs"].append(row(name, seconds, sequences, new))
        except Exception as error:  # one failing variant must not lose the others' figures
            results["runs"].append({"name": name, "error": repr(error)[:500]})
        print(f"[{time.perf_counter() - started:.0f} s]", results["runs"][-1], flush=True)
        save()

    for static in (False, True) if not args.skip_hf else ():
        measure(f"(a) HF generate{' static' if static else ''} {big}x{new}",
                hf_generate(model, tokenizer, texts, new, static), big)
        measure(f"(b) HF generate{' static' if static else ''} batch 1",
                hf_generate(model, tokenizer, texts[:1], new, static), 1)
    if not args.skip_hf:
        decode_ms["HF generate static"] = per_token_ms(partial(hf_generate, model, tokenizer, texts[:1],
                                                               static=True), new, device)

    variants = {"eager": {"cuda_graphs": False}, "graphs": {"compile": False}, "graphs+compile": {}}
    for variant, options in variants.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        engine = EngineGenerator(model, tokenizer, kv_cache_tokens=big * (new + 64), max_num_seqs=big, **options)
        measure(f"(a) r1kit engine [{variant}] {big}x{new}", partial(engine.generate, texts, sampled), big)
        if device.type == "cuda":
            results["runs"][-1]["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        measure(f"(b) r1kit engine [{variant}] batch 1", partial(engine.generate, texts[:1], sampled), 1)

    decode_ms["r1kit engine [graphs+compile]"] = per_token_ms(
        lambda n: partial(engine.generate, texts[:1], dataclasses.replace(sampled, max_tokens=n)), new, device)
    print("(b) batch-1 ms per decoded token, prefill left out:", decode_ms, flush=True)
    save()
    group = SamplingParams(n=g, temperature=1.0, max_tokens=new, ignore_eos=True, seed=0)
    for shared in (True, False):
        engine.engine.share_prompts = shared
        measure(f"(c) r1kit engine {groups}x G={g}, shared prompts {shared}",
                lambda: engine.generate(texts[:groups], group), groups * g)
    engine.engine.share_prompts = True
    rollouts = engine.generate(texts[:4], group)
    fp32 = copy.deepcopy(model).float()
    results["logprob_gap"] = logprob_gap(model, fp32, rollouts, [engine.encode(t) for t in texts[:4]])
    results["weight_sync_ms"] = weight_sync_ms(model, tokenizer)
    checked, short = texts[:16], min(new, 64)
    results["greedy_check"] = greedy_check(fp32, engine_greedy(engine, checked, short),
                                           hf_references(model, tokenizer, checked, short), short)
    print(f"[{time.perf_counter() - started:.0f} s]", results["logprob_gap"], results["greedy_check"], flush=True)
    results["fp32_greedy_check"] = fp32_greedy_check(fp32, tokenizer, checked, short)
    results["decode_breakdown"] = [decode_breakdown(engine, texts[:n]) for n in sorted({1, min(64, big), big})]
    results["phases"] = phases(engine, texts, sampled)
    print(f"[{time.perf_counter() - started:.0f} s]", results["fp32_greedy_check"], results["decode_breakdown"],
          results["phases"], flush=True)
    save()
    if device.type == "cuda":
        try:  # the profiler must not cost the figures above
            results["kernel_profile"] = [kernel_profile(engine, texts[:n]) for n in (1, big)]
        except Exception as error:
            results["kernel_profile"] = repr(error)[:500]

    for r in results["runs"]:
        if "error" not in r:
            print(f"{r['name']:<52} {r['tok_per_s']:>10.0f} tok/s {r['ms_per_step']:>8.2f} ms/step")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))
    save()
    if any("error" in r for r in results["runs"]):
        raise SystemExit("some runs failed: see their errors above")


if __name__ == "__main__":
    main()
