import math

import pytest
import torch
from conftest import hf_greedy

from r1kit.models import load_model
from r1kit.rollout import HFGenerator, SamplingParams
from r1kit.rollout.sampler import SamplingBatch, filter_logits, sample

PROMPTS = ["What is 2 + 2?", "Name a prime number larger than one hundred, please.", "Hi"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def test_greedy_equals_hf_generate(tiny):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, batch_size=2)
    completions = generator.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        ref = hf_greedy(model, generator.encode(prompt), 12, tokenizer.pad_token_id)
        assert completion.token_ids == ref[: len(completion.token_ids)]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_logprobs_equal_a_forward_pass(tiny, temperature):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer)
    params = SamplingParams(n=2, temperature=temperature, top_p=0.9, max_tokens=10, seed=3)
    for completion in generator.generate(PROMPTS[:2], params):
        prompt = generator.encode(PROMPTS[completion.prompt_index])
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        logits = logits / (temperature or 1.0)
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-4)


def test_n_samples_grouped_by_prompt_and_seeded(tiny):
    generator = HFGenerator(*tiny, batch_size=4)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=11)
    first = generator.generate(PROMPTS, params)
    assert [c.prompt_index for c in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c.token_ids for c in generator.generate(PROMPTS, params)] == [c.token_ids for c in first]
    other = generator.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=12))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_stop_strings_cut_the_text(tiny):
    generator = HFGenerator(*tiny)
    full = generator.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=16))[0]
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip()
    cut = generator.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=16, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text) and len(cut.token_ids) <= len(full.token_ids)


def test_eos_and_length_finish_reasons(tiny):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer)
    eos = tokenizer.eos_token_id
    words = tokenizer.encode("hello world", add_special_tokens=False)
    ended = generator._completion([*words, eos, eos, eos], [-0.1] * (len(words) + 3), SamplingParams())
    assert ended.finish_reason == "stop" and ended.token_ids == [*words, eos] and ended.text == "hello world"
    assert len(ended.logprobs) == len(words) + 1
    cut = generator._completion(words, [-0.1] * len(words), SamplingParams())
    assert cut.finish_reason == "length" and cut.token_ids == words


def test_filter_logits_by_hand():
    logits = torch.tensor([[math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]])

    def kept(top_k=0, top_p=1.0, min_p=0.0):
        one = lambda v, dtype: torch.tensor([v], dtype=dtype)  # noqa: E731
        filtered = filter_logits(logits, one(top_k, torch.int64), one(top_p, torch.float32), one(min_p, torch.float32))
        return torch.isfinite(filtered).tolist()

    assert kept(top_p=0.8) == [[True, True, False, False]]
    assert kept(top_p=0.81) == [[True, True, True, False]]
    assert kept(top_p=0.1) == [[True, False, False, False]]
    assert kept(top_k=3) == [[True, True, True, False]]
    assert kept(min_p=0.2) == [[True, True, True, False]]  # 0.05 < 0.2 * 0.5
    assert kept(top_k=2, top_p=0.7) == [[True, True, False, False]]  # nucleus of the top-2: 0.625, 0.375
    assert kept(top_k=2, top_p=0.6) == [[True, False, False, False]]


def test_sampling_follows_the_distribution_and_is_batch_invariant():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 20_000
    logits = probs.log().expand(rows, 4)
    batch = SamplingBatch.of([SamplingParams(temperature=1.0)] * rows, "cpu")
    keys = torch.arange(rows)
    tokens, logprobs = sample(logits, batch, keys, torch.zeros(rows, dtype=torch.int64))
    freq = torch.bincount(tokens, minlength=4).float() / rows
    assert torch.allclose(freq, probs, atol=0.015)
    assert torch.allclose(logprobs, probs.log()[tokens])
    # a row's token depends on its key and step only, not on its neighbours
    one = SamplingBatch.of([SamplingParams()], "cpu")
    alone, _ = sample(logits[:1], one, keys[7:8], torch.zeros(1, dtype=torch.int64))
    assert alone.item() == tokens[7].item()


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="n and max_tokens must be at least 1"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        SamplingParams(top_p=0)


def test_uniforms_stay_strictly_inside_the_unit_interval():
    from r1kit.rollout.sampler import to_unit

    u = to_unit(torch.tensor([0, 2**32 - 1, 2**31, 511, 512]))
    assert (u > 0).all() and (u < 1).all()
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_prompts_encode_in_a_batch_as_one_by_one(tokenizer):
    from r1kit.prompts import build_prompt
    from r1kit.rollout.types import encode_prompts

    chat = build_prompt("What is 2 + 3?", tokenizer, "chat_plain")  # a template that may open with BOS
    prompts = ["plain text", chat, f"{tokenizer.bos_token}already has a BOS", "", chat + " more"]
    one_by_one = [tokenizer(p, add_special_tokens=not p.startswith(tokenizer.bos_token))["input_ids"] for p in prompts]
    assert encode_prompts(tokenizer, prompts) == one_by_one
    assert encode_prompts(tokenizer, []) == []


def test_chunked_argmax_is_argmax_with_its_ties():
    from r1kit.rollout.sampler import chunked_argmax

    torch.manual_seed(0)
    x = torch.randn(5, 3000)
    x[1, 2047] = x[1, 10] = 99.0  # a tie across chunks: the first index wins
    x[2, 2999] = 50.0  # the last column, in the padded chunk
    x[3, 5] = x[3, 6] = 50.0  # a tie within a chunk
    x[4] = float("-inf")
    assert torch.equal(chunked_argmax(x, chunk=1024), x.argmax(-1))
    assert chunked_argmax(x, chunk=1024).tolist()[:4] == [x[0].argmax().item(), 10, 2999, 5]
    many = torch.randn(70, 3000)  # enough rows for the one-pass argmax
    assert torch.equal(chunked_argmax(many, chunk=1024), many.argmax(-1))


def test_the_sampler_compiles_once_for_slices_of_buffers_and_fresh_tensors():
    # the decode step samples from slices of its buffers, the prefill from fresh tensors: one compilation
    from r1kit.rollout.sampler import as_views, column_codes, draw

    compilations = []

    def backend(graph, example_inputs):
        compilations.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(draw, dynamic=True, backend=backend)
    codes, buffers = column_codes(50, torch.device("cpu")), [torch.randn(16, 50), torch.ones(16)]
    for rows, sliced in ((2, True), (3, False), (5, True), (4, False)):
        logits, temperature = (b[:rows] for b in buffers) if sliced else (torch.randn(rows, 50), torch.ones(rows))
        keys = steps = torch.zeros(rows, dtype=torch.long)
        compiled(*as_views([logits, temperature, keys, steps.clone(), codes]))
    assert len(compilations) == 1
