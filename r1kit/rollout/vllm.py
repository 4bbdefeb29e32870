"""The optional vLLM backend, for evaluation where vLLM is installed (`r1kit eval --backend vllm`).

vLLM loads its own copy of the weights from the model's folder, so it never sees a policy's optimizer
steps: training rolls out with r1kit's engine (or HF). Its logprobs are vLLM's own (by default of the
model's distribution before temperature), not the log softmax(logits / T) that r1kit's backends return,
so they are no GRPO old logprobs.
"""

from __future__ import annotations

from r1kit.config import ConfigError
from r1kit.rollout.types import Completion, Progress, SamplingParams, encode_prompt


class VLLMGenerator:
    """The Generator interface over `vllm.LLM` on the model's HF folder."""

    def __init__(self, folder: str, tokenizer, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85):
        try:
            import vllm
        except ImportError:
            raise ConfigError("backend vllm needs vLLM installed (pip install vllm); r1kit's own engine, "
                              "--backend engine, needs nothing more") from None
        self.vllm, self.tokenizer = vllm, tokenizer
        self.llm = vllm.LLM(model=folder, tokenizer=folder, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization)

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids, as r1kit's other backends feed them."""
        return encode_prompt(self.tokenizer, prompt)

    def sampling(self, params: SamplingParams):
        """vLLM's SamplingParams for r1kit's (logprobs=0: the sampled token's own)."""
        return self.vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
            min_p=params.min_p, repetition_penalty=params.repetition_penalty, max_tokens=params.max_tokens,
            stop=list(params.stop) or None, seed=params.seed, logprobs=params.top_logprobs,
            ignore_eos=params.ignore_eos)

    def generate(self, prompts: list[str], params: SamplingParams, progress: Progress | None = None
                 ) -> list[Completion]:
        """n completions per prompt, grouped by prompt in prompt order."""
        outputs = self.llm.generate([{"prompt_token_ids": self.encode(p)} for p in prompts], self.sampling(params),
                                    use_tqdm=False)
        completions = [completion(out, i, params.top_logprobs) for i, request in enumerate(outputs)
                       for out in request.outputs]
        if progress:
            progress(len(completions))
        return completions


def completion(out, prompt_index: int, top_n: int) -> Completion:
    """r1kit's Completion of one vLLM CompletionOutput."""
    token_ids = list(out.token_ids)
    steps = out.logprobs or []
    return Completion(text=out.text, token_ids=token_ids,
                      logprobs=[step[token].logprob for step, token in zip(steps, token_ids, strict=False)],
                      finish_reason="stop" if out.finish_reason == "stop" else "length", prompt_index=prompt_index,
                      top_logprobs=[{t: lp.logprob for t, lp in step.items()} for step in steps] if top_n else None)
