"""Chunked prefill (eager, on CPU): a prompt longer than the step's budget is prefilled over several steps, with the
tokens of a whole prefill, while running sequences keep decoding."""

import random

import pytest
import torch
from conftest import hf_greedy
from test_engine import family_model

from r1kit.rollout import SamplingParams
from r1kit.rollout.engine import LLMEngine, prefill_step
from r1kit.rollout.engine.prefill_step import PrefillStep
from r1kit.rollout.sampler import sequence_key

LENGTHS = (23, 9, 17, 30, 4)  # with 4-token blocks: most prompts end in a partly filled block


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tokenizer):
    return family_model(request.param, tokenizer), tokenizer


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, 5000) for _ in range(n)] for n in LENGTHS]


def new_engine(model, **options) -> LLMEngine:
    return LLMEngine(*model, **{"kv_cache_tokens": 2048, "block_size": 4, **options})


def generate(llm: LLMEngine, params: SamplingParams) -> tuple[list[tuple], list[list[int]]]:
    """Every sequence's (tokens, logprobs) and the prompt lengths of each prefill step's rows."""
    rows, prefill = [], llm.decoder.prefill

    def counted(tokens, slots):
        rows.append([len(t) for t in tokens])
        return prefill(tokens, slots)

    llm.decoder.prefill = counted
    requests = [llm.add_request(ids, params, [sequence_key(7, i * params.n + s) for s in range(params.n)])
                for i, ids in enumerate(prompts())]
    while llm.has_work():
        llm.step()
    assert len(llm.blocks.free) == len(llm.blocks.refs)
    return [(seq.output_ids, seq.logprobs) for r in requests for seq in r.sequences], rows


def assert_same(got: list[tuple], expected: list[tuple]) -> None:
    """The same tokens, and logprobs within float error, for every sequence."""
    for (tokens, logprobs), (expected_tokens, expected_logprobs) in zip(got, expected, strict=True):
        assert tokens == expected_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(expected_logprobs), atol=1e-4)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=12),
                                    SamplingParams(n=3, temperature=1.0, top_k=40, max_tokens=10)],
                         ids=["greedy", "sampled"])
@pytest.mark.parametrize("share_prompts", [True, False])
def test_chunked_prefill_gives_the_tokens_of_a_whole_one(model, params, share_prompts):
    whole, whole_rows = generate(new_engine(model, share_prompts=share_prompts), params)
    chunked, rows = generate(new_engine(model, share_prompts=share_prompts, max_prefill_tokens=5), params)
    assert len(whole_rows) == 1  # every prompt prefilled in one step; chunked, 5 tokens a step at most
    assert all(sum(step) <= 5 for step in rows) and sum(map(sum, rows)) == sum(map(sum, whole_rows))
    assert_same(chunked, whole)
    if params.temperature == 0:
        hf, tokenizer = model
        for ids, (tokens, _) in zip(prompts(), chunked, strict=True):
            assert tokens == hf_greedy(hf, ids, 12, tokenizer.pad_token_id)[: len(tokens)]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=12),
                                    SamplingParams(n=3, temperature=1.0, top_k=40, max_tokens=10)],
                         ids=["greedy", "sampled"])
@pytest.mark.parametrize("share_prompts", [True, False])
@pytest.mark.parametrize("chunk", [5, 16_384])
def test_graphed_prefill_gives_the_tokens_of_the_packed_one(model, params, share_prompts, chunk, monkeypatch):
    # each prompt token a row of the decode forward (PrefillStep), its "graphs" replayed eagerly on the CPU: a
    # token attends to the chunks cached before and to the tokens before it in its own step
    monkeypatch.setattr(PrefillStep, "capture", lambda self, run: run)
    packed, packed_rows = generate(new_engine(model, share_prompts=share_prompts, max_prefill_tokens=chunk), params)
    llm = new_engine(model, share_prompts=share_prompts, max_prefill_tokens=chunk)
    llm.prefill_step = PrefillStep(llm.decoder, 64, llm.blocks.blocks_for(llm.decoder.max_len))
    graphed, rows = generate(llm, params)
    assert_same(graphed, packed)
    # every step ran as graphs (padded to 16, 32 or 64 tokens): a step of more than 64 tokens as several launches
    assert rows == [] and bool(packed_rows)
    assert set(llm.prefill_step.graphs) <= {16, 32, 64}
    assert (64 in llm.prefill_step.graphs) == any(sum(step) > 32 for step in packed_rows)


@pytest.mark.parametrize(("max_tokens", "max_chunks"), [(16, 64), (64, 2), (16, 1)])
def test_a_prefill_step_larger_than_a_graph_runs_as_several_launches(model, max_tokens, max_chunks, monkeypatch):
    # an eval's admission (~16k tokens, ~130 prompts) in launches of the largest graph: cut between chunks, or inside
    # one (its second piece attends to the first, cached by the launch before)
    monkeypatch.setattr(PrefillStep, "capture", lambda self, run: run)
    monkeypatch.setattr(prefill_step, "PREFILL_CHUNKS", max_chunks)
    params = SamplingParams(n=3, temperature=1.0, top_k=40, max_tokens=10)
    expected, packed_rows = generate(new_engine(model), params)
    llm = new_engine(model)
    llm.prefill_step = PrefillStep(llm.decoder, max_tokens, llm.blocks.blocks_for(llm.decoder.max_len))
    launches = []
    run = llm.prefill_step._launch
    monkeypatch.setattr(llm.prefill_step, "_launch", lambda tokens, *args: launches.append(list(map(len, tokens)))
                        or run(tokens, *args))
    graphed, rows = generate(llm, params)
    assert rows == [] and packed_rows == [[23, 9, 17, 30, 4]]
    assert_same(graphed, expected)
    assert all(sum(launch) <= max_tokens and len(launch) <= max_chunks for launch in launches)
    assert sum(map(sum, launches)) == 83 and len(launches) > 1


def test_cut_fills_each_launch_in_order():
    assert prefill_step.cut([5, 3], 8, 64) == [[(0, 0, 5), (1, 0, 3)]]
    assert prefill_step.cut([5, 6, 2], 4, 64) == [[(0, 0, 4)], [(0, 4, 5), (1, 0, 3)], [(1, 3, 6), (2, 0, 1)],
                                                  [(2, 1, 2)]]
    assert prefill_step.cut([1, 1, 1], 8, 2) == [[(0, 0, 1), (1, 0, 1)], [(2, 0, 1)]]


def test_a_prefill_step_past_the_graphs_context_takes_the_packed_forward(model, monkeypatch):
    # the graphed prefill reads a token's whole context for each token: past PREFILL_CONTEXT the packed forward runs
    monkeypatch.setattr(PrefillStep, "capture", lambda self, run: run)
    monkeypatch.setattr(prefill_step, "PREFILL_CONTEXT", 16)
    params = SamplingParams(temperature=0, max_tokens=6)
    expected, _ = generate(new_engine(model, max_prefill_tokens=5), params)
    llm = new_engine(model, max_prefill_tokens=5)
    llm.prefill_step = PrefillStep(llm.decoder, 64, llm.blocks.blocks_for(llm.decoder.max_len))
    ends = []
    fits = llm.prefill_step.fits
    monkeypatch.setattr(llm.prefill_step, "fits", lambda context: ends.append(context) or fits(context))
    graphed, packed_rows = generate(llm, params)
    assert [tokens for tokens, _ in graphed] == [tokens for tokens, _ in expected]
    # 5-token chunks in order: the steps whose chunks end past 16 ran packed, the others as graphs
    assert len(packed_rows) == sum(end > 16 for end in ends) > 0 and llm.prefill_step.graphs


def test_capturing_every_prefill_graph_touches_no_sequence(model, monkeypatch):
    # the server's warm-up captures every bucket on padding rows, which write only the scratch slot: between
    # requests, it must change nothing the next prefill or a running sequence reads
    monkeypatch.setattr(PrefillStep, "capture", lambda self, run: run)
    params = SamplingParams(n=3, temperature=1.0, top_k=40, max_tokens=10)
    expected, _ = generate(new_engine(model, max_prefill_tokens=5), params)
    llm = new_engine(model, max_prefill_tokens=5)
    llm.prefill_step = PrefillStep(llm.decoder, 64, llm.blocks.blocks_for(llm.decoder.max_len))
    cache = llm.decoder.k_cache.clone()
    llm.prefill_step.capture_all()
    assert sorted(llm.prefill_step.graphs) == [16, 32, 64]
    scratch = llm.decoder.scratch_slot
    assert torch.equal(llm.decoder.k_cache[:, :scratch], cache[:, :scratch])
    assert [tokens for tokens, _ in generate(llm, params)[0]] == [tokens for tokens, _ in expected]


def test_running_sequences_get_a_token_every_other_step_while_a_long_prompt_prefills(model):
    llm = new_engine(model, max_prefill_tokens=5, prefill_delay=0.0)  # an arrival is admitted at once
    params = SamplingParams(max_tokens=30, ignore_eos=True, seed=1)
    short = llm.add_request(prompts()[4], params).sequences[0]
    llm.step()
    assert llm.last_step == "prefill" and len(short.output_ids) == 1
    long = llm.add_request(prompts()[0], SamplingParams(n=2, max_tokens=8, ignore_eos=True, seed=2))
    steps = []
    while not long.sequences[0].output_ids:
        steps.append((llm.step(), llm.last_step))
    # 23 tokens in chunks of 5: a decode step of the running sequence before each, the first tokens after the last
    assert [kind for _, kind in steps] == ["decode", "prefill"] * 5
    assert [advanced for advanced, _ in steps] == [[short], []] * 4 + [[short], long.sequences]
    assert long.prefilled == 23 and len(short.output_ids) == 6


def test_aborting_mid_prefill_frees_every_block(model):
    llm = new_engine(model, max_prefill_tokens=5, prefill_delay=0.0)
    free = len(llm.blocks.free)
    running = llm.add_request(prompts()[4], SamplingParams(max_tokens=30, ignore_eos=True))
    llm.step()
    held = free - len(llm.blocks.free)
    long = llm.add_request(prompts()[3], SamplingParams(n=3, max_tokens=8))
    waiting = llm.add_request(prompts()[2], SamplingParams(max_tokens=8))
    for _ in range(4):  # decode, 5 prompt tokens, decode, 5 more
        llm.step()
    assert llm.scheduler.prefilling == [long] and long.prefilled == 10 and list(llm.scheduler.waiting) == [waiting]
    llm.abort(long)
    llm.abort(waiting)
    assert not llm.scheduler.prefilling and not llm.scheduler.waiting
    assert len(llm.blocks.free) == free - held
    assert all(seq.finish_reason == "abort" and not seq.output_ids for r in (long, waiting) for seq in r.sequences)
    while llm.has_work():
        llm.step()
    assert running.sequences[0].finish_reason == "length" and len(llm.blocks.free) == free


def test_aborting_a_sequence_that_ended_before_its_blocks_went_back_frees_them(model):
    # an interrupt (Ctrl-C) between a sequence's last token and the return of its blocks leaves it ended but
    # holding them; aborting its request must free them, or the engine keeps a row that never leaves
    llm = new_engine(model, prefill_delay=0.0)
    free = len(llm.blocks.free)
    request = llm.add_request(prompts()[2], SamplingParams(n=2, max_tokens=30, ignore_eos=True))
    llm.step()
    ended = request.sequences[0]
    ended.finish_reason = "length"  # as the interrupted recording left it
    llm.abort(request)
    assert not llm.has_work() and len(llm.blocks.free) == free
    assert ended.finish_reason == "length" and request.sequences[1].finish_reason == "abort"
