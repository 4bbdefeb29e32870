"""Generation behind one interface: `Generator.generate(prompts, SamplingParams) -> list[Completion]`."""

from __future__ import annotations

from r1kit.rollout.hf import HFGenerator
from r1kit.rollout.types import Completion, Generator, SamplingParams

__all__ = ["Completion", "Generator", "HFGenerator", "SamplingParams", "make_generator"]

BACKENDS = ("auto", "hf")


def make_generator(model, tokenizer, backend: str = "auto", batch_size: int = 64) -> Generator:
    """The generator for a loaded model; `auto` is HF generate until the rollout engine lands."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return HFGenerator(model, tokenizer, batch_size=batch_size)
