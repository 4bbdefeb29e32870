"""r1kit's rollout engine: paged KV cache, continuous batching, group-shared prompts, shared weights."""

from r1kit.rollout.engine.engine import EngineGenerator, LLMEngine

__all__ = ["EngineGenerator", "LLMEngine"]
