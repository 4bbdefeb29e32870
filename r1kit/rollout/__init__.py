"""Generation behind one interface: `Generator.generate(prompts, SamplingParams) -> list[Completion]`."""

from __future__ import annotations

import warnings

import torch

from r1kit.rollout.hf import HFGenerator
from r1kit.rollout.types import Completion, Generator, SamplingParams

__all__ = ["Completion", "Generator", "HFGenerator", "SamplingParams", "kv_cache_tokens", "make_generator",
           "uses_engine"]

BACKENDS = ("auto", "hf", "engine")
KV_MEMORY_SHARE = 0.3  # of free GPU memory, leaving the rest to training


def uses_engine(backend: str, model) -> bool:
    """Whether `backend` means the rollout engine for this model (`auto`: on a GPU, if the engine runs the
    model; HF generate otherwise)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto" or next(model.parameters()).device.type != "cuda":
        return backend == "engine"
    from r1kit.rollout.engine.model import unsupported

    return unsupported(model) is None


def kv_cache_tokens(free_bytes: int, bytes_per_token: int, batch_size: int, max_seq_tokens: int | None) -> int:
    """The engine's KV cache in tokens: KV_MEMORY_SHARE of the free GPU memory, and no more than batch_size
    sequences of max_seq_tokens can fill (each with a partly empty last block) when that bound is known."""
    from r1kit.rollout.engine.engine import BLOCK_SIZE

    tokens = int(KV_MEMORY_SHARE * free_bytes) // bytes_per_token
    return min(tokens, batch_size * (max_seq_tokens + BLOCK_SIZE)) if max_seq_tokens else tokens


def make_generator(model, tokenizer, backend: str = "auto", batch_size: int = 64,
                   max_seq_tokens: int | None = None, compile: bool = True) -> Generator:
    """The generator for a loaded model.

    `engine` is r1kit's rollout engine (paged KV cache, continuous batching, shared group prompts,
    CUDA graphs); `auto` picks it on a GPU where it runs the model (HF generate otherwise, saying why).
    On a GPU its KV cache is sized by kv_cache_tokens: with max_seq_tokens (prompt + completion) given, a run
    takes only what its batch can fill and leaves the rest of the GPU to others. `compile` compiles its decode
    layers and sampler (CUDA graphs either way).
    """
    device = next(model.parameters()).device
    if not uses_engine(backend, model):
        if backend == "auto" and device.type == "cuda":
            from r1kit.rollout.engine.model import unsupported

            warnings.warn(f"{unsupported(model)}: backend auto generates with HF generate", stacklevel=2)
        return HFGenerator(model, tokenizer, batch_size=batch_size)
    from r1kit.rollout.engine import EngineGenerator
    from r1kit.rollout.engine.engine import kv_bytes_per_token

    dtype = torch.bfloat16 if device.type == "cuda" else None
    kv_tokens = 65_536
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        kv_tokens = kv_cache_tokens(free, kv_bytes_per_token(model.config, dtype), batch_size, max_seq_tokens)
    return EngineGenerator(model, tokenizer, kv_cache_tokens=kv_tokens, max_num_seqs=max(batch_size, 1), dtype=dtype,
                           compile=compile)
