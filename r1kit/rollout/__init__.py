"""Generation behind one interface: `Generator.generate(prompts, SamplingParams) -> list[Completion]`."""

from __future__ import annotations

import warnings

import torch

from r1kit.rollout.hf import HFGenerator
from r1kit.rollout.types import Completion, Generator, SamplingParams

__all__ = ["Completion", "Generator", "HFGenerator", "SamplingParams", "make_generator", "uses_engine"]

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


def make_generator(model, tokenizer, backend: str = "auto", batch_size: int = 64) -> Generator:
    """The generator for a loaded model.

    `engine` is r1kit's rollout engine (paged KV cache, continuous batching, shared group prompts,
    CUDA graphs); `auto` picks it on a GPU where it runs the model (HF generate otherwise, saying why).
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
        kv_tokens = int(KV_MEMORY_SHARE * free) // kv_bytes_per_token(model.config, dtype)
    return EngineGenerator(model, tokenizer, kv_cache_tokens=kv_tokens, max_num_seqs=max(batch_size, 1), dtype=dtype)
