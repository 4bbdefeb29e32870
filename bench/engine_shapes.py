"""The rollout engine at the distilled models' shapes against HF `generate` and the HBM floor (serving issue).

The shapes are R1-Distill-Qwen-7B's and -32B's configs (bench/big_checkpoint.py) with random bf16 weights made on
the GPU and the vocabulary cut to the embedded model's 49,152. Per shape, in one call:
- the floor: the bytes a decode step reads (every weight but the embedding) over the card's nominal bandwidth and
  over the copy bandwidth measured here;
- every projection alone (cuBLAS and cuBLASLt, at 1, 2 and 256 rows): what a matmul reaches at these shapes. They
  are launched from a Python loop, so a call shorter than its launch (~20 us: the small projections at 1-2 rows)
  measures the launch; the kernel profile below times those;
- the engine (graphs + compile, as shipped): ms per decoded token at batch 1, tokens/s at 256 x 256, one step's
  breakdown and its GPU time by kernel at both sizes;
- HF `generate` (plain, and with its static cache at batch 1), as the issue's table ran it.
Every sequence generates exactly the requested tokens (ignore_eos / min_new_tokens), T=1.

  python bench/engine_shapes.py --shape 7b 32b --out $OUT/engine_shapes.json
  python bench/engine_shapes.py --shape default --batch 512 --skip-hf    # the embedded model's engine figures
  python bench/engine_shapes.py --shape tiny --device cpu --skip-hf       # the CPU check
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial

import torch
import torch.nn.functional as F
from bench_io import save_json
from big_checkpoint import shape_config
from rollout import decode_breakdown, hf_generate, kernel_profile, per_token_ms, prompts, row, timed

from r1kit.models import load_model, load_tokenizer
from r1kit.rollout import SamplingParams
from r1kit.rollout.engine import EngineGenerator

NOMINAL_TB_S = {"NVIDIA H200": 4.8, "NVIDIA H100 80GB HBM3": 3.35}


def random_model(shape: str, device: torch.device):
    """A Qwen2 model of the shape with random bf16 weights, made where it runs (never a float32 copy)."""
    from transformers import AutoModelForCausalLM

    with device:
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=torch.bfloat16)
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix once


def read_bytes(model) -> int:
    """Bytes of weights a decode step reads: all but the embedding (one row of it a token), unless the output
    head is the embedding."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    return weight_bytes(model) - (0 if tied else embedding.numel() * embedding.element_size())


def copy_tb_s(device: torch.device, gb: float = 4.0) -> float:
    """The device's bandwidth as a large copy sees it (bytes read + written per second), in TB/s."""
    src = torch.empty(int(gb * 1e9) // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds, _ = timed(lambda: dst.copy_(src), device)
    return round(2 * src.numel() * 2 / seconds / 1e12, 3)


def projections(config) -> dict[str, tuple[int, int]]:
    """(out, in) features of each matmul a decode step runs, q/k/v and gate/up fused as the engine runs them."""
    hidden, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    return {"qkv": (qkv, hidden), "o": (hidden, hidden), "gate_up": (2 * config.intermediate_size, hidden),
            "down": (hidden, config.intermediate_size), "lm_head": (config.vocab_size, hidden)}


def matmul_rows(config, device: torch.device, rows: tuple[int, ...] = (1, 2, 256), repeats: int = 50) -> list[dict]:
    """Each projection alone at each row count, cycling through copies of its weight that together outgrow
    the L2 cache (so every call reads its weight from HBM, as a decode step's layers do): microseconds,
    the weight's bytes over that time, and TFLOPS."""
    out = []
    for name, (n, k) in projections(config).items():
        copies = max(1, -(-256 * 2**20 // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device=device) for _ in range(copies)]
        calls = weights * -(-repeats // copies)
        for library in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(library)
            for m in rows:
                us = 1e6 * timed(partial(linears, torch.randn(m, k, dtype=torch.bfloat16, device=device), calls),
                                 device)[0] / len(calls)
                out.append({"matmul": name, "shape": [m, n, k], "blas": library, "us": round(us, 2),
                            "weight_tb_s": round(n * k * 2 / us / 1e6, 3),
                            "tflops": round(2 * m * n * k / us / 1e6, 1)})
    torch.backends.cuda.preferred_blas_library("cublas")
    return out


def linears(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    """x through each weight in turn."""
    for w in weights:
        F.linear(x, w)


def engine_rows(model, tokenizer, texts: list[str], new: int, results: dict, save) -> None:
    """The engine as shipped: batch-1 ms per decoded token, len(texts) x new tokens/s, a step's breakdown and
    kernels at 1 and len(texts) sequences."""
    device, big = model.device, len(texts)
    sampled = SamplingParams(temperature=1.0, max_tokens=new, ignore_eos=True, seed=0)
    engine = EngineGenerator(model, tokenizer, kv_cache_tokens=big * (new + 64), max_num_seqs=big)
    seconds, _ = timed(partial(engine.generate, texts, sampled), device)
    results["runs"].append(row(f"r1kit engine {big}x{new}", seconds, big, new))
    save()
    results["batch1_ms_per_decoded_token"]["r1kit engine"] = per_token_ms(
        lambda n: partial(engine.generate, texts[:1], dataclasses.replace(sampled, max_tokens=n)), new, device)
    save()
    results["decode_breakdown"] = [decode_breakdown(engine, texts[:n]) for n in (1, big)]
    save()
    if device.type == "cuda":
        results["kernel_profile"] = [kernel_profile(engine, texts[:n]) for n in (1, big)]
        save()


def hf_rows(model, tokenizer, texts: list[str], new: int, results: dict, save, static: bool) -> None:
    """HF generate: batch-1 ms per decoded token (plain, and with its static cache when asked), and
    len(texts) x new/2 tokens/s (plain)."""
    device, big = model.device, len(texts)
    decode_ms = results["batch1_ms_per_decoded_token"]
    for kind in ("plain", "static") if static else ("plain",):
        decode_ms[f"HF generate {kind}"] = per_token_ms(
            partial(hf_generate, model, tokenizer, texts[:1], static=kind == "static"), new, device)
        save()
    seconds, _ = timed(hf_generate(model, tokenizer, texts, new // 2, static=False), device)
    results["runs"].append(row(f"HF generate {big}x{new // 2}", seconds, big, new // 2))
    save()


def measure(shape: str, device: torch.device, args, save) -> dict:
    """Every figure of one shape (saved as it comes through `save`)."""
    tokenizer = load_tokenizer("default")
    model = load_model("default", str(device))[0] if shape == "default" else random_model(shape, device)
    step_bytes = read_bytes(model)
    results: dict = {"shape": shape, "weights_gb": round(weight_bytes(model) / 1e9, 2),
                     "step_read_gb": round(step_bytes / 1e9, 2), "runs": [], "batch1_ms_per_decoded_token": {}}
    save(results)
    if device.type == "cuda":
        measured = copy_tb_s(device)
        nominal = NOMINAL_TB_S.get(torch.cuda.get_device_name())
        results["copy_tb_s"] = measured
        results["floor_ms"] = {"copy bandwidth": round(step_bytes / measured / 1e9, 3)}
        if nominal:
            results["floor_ms"]["nominal bandwidth"] = round(step_bytes / nominal / 1e9, 3)
        results["matmuls"] = matmul_rows(model.config, device)
        save(results)
    texts = prompts(tokenizer, args.batch)
    engine_rows(model, tokenizer, texts, args.new, results, lambda: save(results))
    if not args.skip_hf:
        hf_rows(model, tokenizer, texts, args.new, results, lambda: save(results), device.type == "cuda")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["7b", "32b"],
                        help="shapes of bench/big_checkpoint.py, or 'default' (the embedded model itself)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256, help="sequences of the large-batch run")
    parser.add_argument("--new", type=int, default=256, help="tokens each sequence generates")
    parser.add_argument("--skip-hf", action="store_true", help="the engine's rows only")
    parser.add_argument("--out", help="write the figures here as JSON, as they come")
    args = parser.parse_args()
    device = torch.device(args.device)
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shapes": []}
    started = time.perf_counter()
    for shape in args.shape:
        report["shapes"].append({})

        def save(results: dict) -> None:
            report["shapes"][-1] = results
            save_json(report, args.out)

        results = measure(shape, device, args, save)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the shape's model is gone: its memory goes back before the next is made
        print(f"[{time.perf_counter() - started:.0f} s] {shape}:", {k: v for k, v in results.items()
              if k not in ("matmuls", "kernel_profile", "decode_breakdown")}, flush=True)


if __name__ == "__main__":
    main()
