"""The reference backend: HF `generate` for the forward passes and KV cache, r1kit's sampler for tokens."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from r1kit.rollout.sampler import SamplingBatch, request_seed, sample, sequence_key, top_logprobs
from r1kit.rollout.types import (
    Completion,
    Progress,
    RoundByRound,
    SamplingParams,
    cut_at_stop,
    encode_prompt,
    encode_prompts,
)


class _Sampler(LogitsProcessor):
    """Samples with r1kit's sampler and forces HF's greedy step to take that token, recording its logprob."""

    def __init__(self, params: SamplingParams, keys: list[int], pad_widths: list[int], device: torch.device):
        self.params, self.batch = params, SamplingBatch.of([params] * len(keys), device)
        self.keys = torch.tensor(keys, device=device)
        self.pad_widths = torch.tensor(pad_widths, device=device)
        self.logprobs: list[torch.Tensor] = []
        self.top: list[list[dict[int, float]]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        steps = torch.full_like(self.keys, len(self.logprobs))
        history = None
        if self.batch.penalized:  # left padding is no history
            columns = torch.arange(input_ids.shape[1], device=input_ids.device)
            history = input_ids.masked_fill(columns[None, :] < self.pad_widths[:, None], -1)
        tokens, logprobs = sample(scores.float(), self.batch, self.keys, steps, history)
        self.logprobs.append(logprobs)
        if self.params.top_logprobs:
            self.top.append(top_logprobs(scores.float(), self.batch, self.params.top_logprobs))
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(-1, tokens[:, None], 0.0)


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a sequence for this model (generation config and tokenizer)."""
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class HFGenerator(RoundByRound):
    """Generator backed by `model.generate`, batching prompts of similar length together."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids as this generator feeds them to the model."""
        return encode_prompt(self.tokenizer, prompt)

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams, progress: Progress | None = None
                 ) -> list[Completion]:
        """n completions per prompt, grouped by prompt in prompt order."""
        seed = request_seed(params.seed)
        encoded = encode_prompts(self.tokenizer, prompts)
        jobs = sorted(((i, s) for i in range(len(prompts)) for s in range(params.n)),
                      key=lambda job: -len(encoded[job[0]]))
        results: dict[tuple[int, int], Completion] = {}
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            keys = [sequence_key(seed, i * params.n + s) for i, s in batch]
            completions = self._generate_batch([encoded[i] for i, _ in batch], params, keys)
            for (i, s), completion in zip(batch, completions, strict=True):
                completion.prompt_index = i
                results[i, s] = completion
            if progress:
                progress(len(batch))
        return [results[i, s] for i in range(len(prompts)) for s in range(params.n)]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, keys: list[int]
                        ) -> list[Completion]:
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.model.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                      device=self.model.device)
        sampler = _Sampler(params, keys, [width - len(p) for p in prompts], self.model.device)
        # Stop strings are cut afterwards (_stop_position), as the engine does: HF's own stop-string check
        # ended sequences whose text did not contain the string yet (seen with a tiny Qwen3 in the tests).
        config = GenerationConfig(max_new_tokens=params.max_tokens, do_sample=False, pad_token_id=self.pad_id,
                                  eos_token_id=None if params.ignore_eos else sorted(self.eos_ids))
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                  logits_processor=LogitsProcessorList([sampler]))
        new_tokens = out[:, width:].tolist()
        logprobs = torch.stack(sampler.logprobs, 1).tolist()
        completions = [self._completion(tokens, lps, params) for tokens, lps in zip(new_tokens, logprobs, strict=True)]
        if params.top_logprobs:
            for row, completion in enumerate(completions):
                completion.top_logprobs = [step[row] for step in sampler.top[: len(completion.token_ids)]]
        return completions

    def _completion(self, tokens: list[int], logprobs: list[float], params: SamplingParams) -> Completion:
        end = None if params.ignore_eos else next((t + 1 for t, tok in enumerate(tokens) if tok in self.eos_ids), None)
        stop_at = self._stop_position(tokens[: end or len(tokens)], params.stop)
        if stop_at is not None:
            ids, text = tokens[:stop_at[0]], stop_at[1]
            reason = "stop"
        elif end is not None:
            ids, reason = tokens[:end], "stop"
            text = self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
        else:
            ids, reason = tokens, "length"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(text=text, token_ids=ids, logprobs=logprobs[: len(ids)], finish_reason=reason)

    def _stop_position(self, tokens: list[int], stop: tuple[str, ...]) -> tuple[int, str] | None:
        """(tokens kept, text before the stop string) for the first stop string produced, if any."""
        if not stop:
            return None
        if cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), stop) is None:
            return None
        for t in range(1, len(tokens) + 1):
            cut = cut_at_stop(self.tokenizer.decode(tokens[:t], skip_special_tokens=True), stop)
            if cut is not None:
                return t, cut
        return None
