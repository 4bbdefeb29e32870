"""The rollout engine (eager, on CPU) against HF on tiny random Llama, Qwen2, Qwen3 and Mistral models."""

import copy
import dataclasses

import pytest
import torch
from conftest import hf_greedy
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from r1kit.rollout import HFGenerator, SamplingParams
from r1kit.rollout.engine import EngineGenerator, LLMEngine
from r1kit.rollout.sampler import sequence_key
from r1kit.rollout.types import encode_prompt

PROMPTS = ["What is 2 + 2?", "Name a prime number larger than one hundred, please, and explain why.", "Hi",
           "Count: one two three four five six seven eight nine ten eleven twelve thirteen"]
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 160}),
}


def family_model(family: str, tokenizer):
    """A 2-layer random model of one of FAMILIES (seed 0) on the tokenizer's vocabulary."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **extra)
    model = model_cls(config).eval()
    if family == "qwen2":  # random biases, so the q/k/v bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tokenizer):
    return family_model(request.param, tokenizer), tokenizer


def engine(model, tokenizer, **kw):
    return EngineGenerator(model, tokenizer, **{"kv_cache_tokens": 4096, "block_size": 4, **kw})


def test_greedy_equals_hf_generate(tiny):
    model, tokenizer = tiny
    gen = engine(model, tokenizer)
    completions = gen.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16))
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        ref = hf_greedy(model, gen.encode(prompt), 16, tokenizer.pad_token_id)
        assert completion.token_ids == ref[: len(completion.token_ids)]
        assert len(completion.token_ids) == 16 or completion.finish_reason == "stop"


def test_sampled_logprobs_equal_a_forward_pass(tiny):
    model, tokenizer = tiny
    gen = engine(model, tokenizer)
    for completion in gen.generate(PROMPTS, SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=10, seed=1)):
        prompt = gen.encode(PROMPTS[completion.prompt_index])
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1 : -1]
        expected = (logits / 0.8).log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(completion.logprobs), expected, atol=1e-4)


def test_same_tokens_as_the_hf_backend_under_a_seed(tiny):
    model, tokenizer = tiny
    params = SamplingParams(n=3, temperature=1.0, top_k=50, max_tokens=12, seed=7)
    ours = engine(model, tokenizer).generate(PROMPTS, params)
    theirs = HFGenerator(model, tokenizer).generate(PROMPTS, params)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]


def test_continuous_batching_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3)
    together = engine(model, tokenizer).generate(PROMPTS, params)
    # two sequences at a time, and a cache that holds only a few requests: they queue and take freed slots
    squeezed = engine(model, tokenizer, max_num_seqs=2, kv_cache_tokens=128).generate(PROMPTS, params)
    alone = []
    for i, prompt in enumerate(PROMPTS):  # each prompt by itself, with the keys it has in the batch
        llm = LLMEngine(model, tokenizer, kv_cache_tokens=4096, block_size=4)
        keys = [sequence_key(3, i * 2 + s) for s in (0, 1)]
        request = llm.add_request(encode_prompt(tokenizer, prompt), params, keys)
        while llm.has_work():
            llm.step()
        alone += [type(together[0])(seq.text, seq.output_ids) for seq in request.sequences]
    assert [c.token_ids for c in together] == [c.token_ids for c in squeezed] == [c.token_ids for c in alone]


def test_shared_group_prompts_equal_unshared(tiny):
    model, tokenizer = tiny
    params = SamplingParams(n=4, temperature=1.0, max_tokens=10, seed=11)
    shared = engine(model, tokenizer, share_prompts=True)
    unshared = engine(model, tokenizer, share_prompts=False)
    a, b = shared.generate(PROMPTS, params), unshared.generate(PROMPTS, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [lp for c in a for lp in c.logprobs] == pytest.approx([lp for c in b for lp in c.logprobs], abs=1e-5)
    blocks = shared.engine.blocks
    assert len(blocks.free) == len(blocks.refs) and not any(blocks.refs)  # every block returned


def test_group_members_share_the_prompt_blocks(tiny):
    model, tokenizer = tiny
    llm = LLMEngine(model, tokenizer, kv_cache_tokens=4096, block_size=4)
    prompt = tokenizer.encode("one two three four five six seven eight nine ten")  # 10 tokens: 2 full blocks
    request = llm.add_request(prompt, SamplingParams(n=3, max_tokens=4, seed=0))
    llm.step()
    tables = [seq.block_table for seq in request.sequences]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3  # the partly filled third block is each member's own
    assert llm.blocks.refs[tables[0][0]] == 3


def test_stop_strings_and_reproducible_seeds(tiny):
    model, tokenizer = tiny
    gen = engine(model, tokenizer)
    full = gen.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=16))[0]
    stop = full.text[len(full.text) // 2 :][:3]
    cut = gen.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=16, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    hf_cut = HFGenerator(model, tokenizer).generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=16,
                                                                                stop=(stop,)))[0]
    assert (cut.text, cut.token_ids) == (hf_cut.text, hf_cut.token_ids)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=9)
    assert [c.token_ids for c in gen.generate(PROMPTS, params)] == [c.token_ids for c in gen.generate(PROMPTS, params)]


def test_weights_are_shared_or_refreshed_in_place(tiny):
    model, tokenizer = tiny
    same = LLMEngine(model, tokenizer, kv_cache_tokens=64)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert same.decoder.w["model.layers.0.mlp.up_proj.weight"].data_ptr() == weight.data_ptr()
    low = LLMEngine(model, tokenizer, kv_cache_tokens=64, dtype=torch.bfloat16)
    buffer = low.decoder.w["model.layers.0.mlp.up_proj.weight"]
    pointer = buffer.data_ptr()
    with torch.no_grad():
        weight.add_(1.0)
    assert not torch.equal(buffer, weight.to(torch.bfloat16))
    low.sync_weights()
    assert torch.equal(buffer, weight.to(torch.bfloat16)) and buffer.data_ptr() == pointer
    with torch.no_grad():
        weight.sub_(1.0)


def test_request_larger_than_the_cache_is_refused(tiny):
    model, tokenizer = tiny
    llm = LLMEngine(model, tokenizer, kv_cache_tokens=40, block_size=4)
    # 30 prompt tokens + 4 new in blocks of 4: 7 shared prompt blocks + 2 own blocks for each of 2 sequences
    with pytest.raises(ValueError, match="needs 11 KV blocks and the cache has 10"):
        llm.add_request([1] * 30, SamplingParams(n=2, max_tokens=4))
    with pytest.raises(ValueError, match="30 prompt tokens \\+ max_tokens 11 exceed the engine's context of 40"):
        llm.add_request([1] * 30, SamplingParams(max_tokens=11))


def test_repetition_penalty_and_top_logprobs_agree_with_hf(tiny):
    model, tokenizer = tiny
    params = SamplingParams(n=2, temperature=0.7, repetition_penalty=1.3, top_logprobs=3, max_tokens=10, seed=5)
    ours = engine(model, tokenizer).generate(PROMPTS, params)
    theirs = HFGenerator(model, tokenizer).generate(PROMPTS, params)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert len(a.top_logprobs) == len(a.token_ids)
        assert [list(t) for t in a.top_logprobs] == [list(t) for t in b.top_logprobs]
        assert all(len(t) == 3 and max(t.values()) >= lp - 1e-6 for t, lp in zip(a.top_logprobs, a.logprobs,
                                                                                 strict=True))
    # HF's greedy decoding with its own repetition penalty picks the same tokens
    greedy = engine(model, tokenizer).generate(PROMPTS[:1], SamplingParams(temperature=0, repetition_penalty=1.3,
                                                                           max_tokens=12))[0]
    ref = hf_greedy(model, encode_prompt(tokenizer, PROMPTS[0]), 12, tokenizer.pad_token_id, repetition_penalty=1.3)
    assert greedy.token_ids == ref[: len(greedy.token_ids)]


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=["all", "q-v"])
def test_lora_model_through_a_merged_view(tiny, targets):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = tiny
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=rng)  # peft starts B at zero: make the adapters matter
    gen = engine(model, tokenizer)
    lw = gen.engine.decoder.layer_weights[0]
    # q/k/v fuse when all are merged or none is; gate/up, shared or merged alike, always
    assert (lw.qkv is not None) == (targets == "all-linear") and lw.gate_up is not None
    prompt = gen.encode(PROMPTS[1])

    def check():
        ours = gen.generate(PROMPTS[1:2], SamplingParams(temperature=0, max_tokens=12))[0]
        with torch.no_grad():
            ref = hf_greedy(model, prompt, 12, tokenizer.pad_token_id)
        assert ours.token_ids == ref[: len(ours.token_ids)]
        return ours.token_ids

    before = check()
    assert before != hf_greedy(base, prompt, 12, tokenizer.pad_token_id)[: len(before)]  # the adapters count
    with torch.no_grad():  # an optimizer step on the adapters, then the engine's refresh
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.add_(torch.randn_like(p) * 0.5)
    gen.sync_weights()
    assert check() != before


def test_one_request_after_another_equals_each_alone(tiny):
    # a finished sequence's memory is reused by the next one's: the engine must not take it for the same
    model, tokenizer = tiny
    gen = engine(model, tokenizer)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    one_by_one = [gen.generate([p], greedy)[0].token_ids for p in PROMPTS]
    assert one_by_one == [engine(model, tokenizer).generate([p], greedy)[0].token_ids for p in PROMPTS]


def test_graph_buckets_cover_every_batch_and_skip_one():
    from r1kit.rollout.engine.decode_step import buckets_for

    buckets = buckets_for(512)
    assert buckets[:5] == [2, 4, 8, 16, 32] and buckets[-1] == 512 and all(b % 16 == 0 for b in buckets[3:])
    assert buckets_for(1) == [2] and buckets_for(40)[-1] == 48


def test_priming_runs_the_smallest_bucket_first_and_changes_no_token(tokenizer, monkeypatch):
    # the compiled forward's first call sets its kernels' launch configs for every size: a compiling engine
    # primes it at the smallest bucket, on padding rows, before any sequence runs
    from r1kit.rollout.engine.decode_step import DecodeStep

    monkeypatch.setattr(DecodeStep, "capture", lambda self, run: run)  # no CUDA graphs on the CPU
    model = family_model("llama", tokenizer)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, ignore_eos=True, seed=3)

    def run(prime: bool) -> tuple[list[list[int]], list[int]]:
        llm = LLMEngine(model, tokenizer, kv_cache_tokens=4096, block_size=4)
        width = llm.blocks.blocks_for(llm.decoder.max_len)
        llm.decode_step = DecodeStep(llm.decoder, 16, width, graphs=True, compile=False)
        rows, decode = [], llm.decoder.decode
        llm.decoder.decode = lambda tokens, *args: rows.append(len(tokens)) or decode(tokens, *args)
        if prime:
            llm.decode_step.prime()
        requests = [llm.add_request(tokenizer.encode(p), params) for p in PROMPTS]
        while llm.has_work():
            llm.step()
        return [s.output_ids for r in requests for s in r.sequences], rows

    (primed, primed_rows), (plain, plain_rows) = run(prime=True), run(prime=False)
    assert primed == plain
    assert primed_rows == [2] + plain_rows and plain_rows[0] == 16  # 12 sequences: the bucket of 16


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["shared", "owned"])
def test_compiled_layers_equal_eager_and_compile_once(tokenizer, dtype):
    import warnings

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    llm = LLMEngine(model, tokenizer, kv_cache_tokens=1024, block_size=4, dtype=dtype)
    assert llm.decoder.layer_weights[0].qkv is not None and llm.decoder.layer_weights[0].gate_up is not None
    for i, prompt in enumerate(PROMPTS):
        llm.add_request(encode_prompt(tokenizer, prompt), SamplingParams(max_tokens=4, ignore_eos=True, seed=i))
    llm.step()
    llm._running(llm.scheduler.running)
    args = llm.decode_step.inputs(len(llm.scheduler.running))
    eager = llm.decoder.decode(*args)
    prompts = [encode_prompt(tokenizer, p) for p in PROMPTS]
    slots = [[llm._slot(seq, p) for p in range(len(seq.prompt_ids))] for seq in llm.scheduler.running]
    llm.decoder.k_cache.zero_()
    eager_prefill = llm.decoder.prefill(prompts, slots)
    cache = llm.decoder.k_cache.clone()
    graphs_before = counters["stats"]["unique_graphs"]
    llm.decoder.compile_layers(prefill=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed compile falls back with a warning: fail instead
        assert torch.allclose(llm.decoder.decode(*args), eager, atol=1e-4)
        assert torch.allclose(llm.decoder.decode(*[a[:2] for a in args]), eager[:2], atol=1e-4)
        llm.decoder.k_cache.zero_()
        assert torch.allclose(llm.decoder.prefill(prompts, slots), eager_prefill, atol=1e-4)
        assert torch.allclose(llm.decoder.k_cache, cache, atol=1e-5)  # the prompts' KV written again, as eagerly
        assert torch.allclose(llm.decoder.prefill(prompts[1:3], slots[1:3]), eager_prefill[1:3], atol=1e-4)
    # one layer graph each for decode and prefill serves all six layers and every batch and prompt length
    assert counters["stats"]["unique_graphs"] - graphs_before <= 4


def test_padded_graph_buckets_change_no_sequence(tiny, monkeypatch):
    # The CUDA-graph runner on the CPU, each "graph" replaying its step eagerly: padding a batch up to its
    # bucket (rows that write to the scratch slot and attend to one token) must not touch real sequences.
    from r1kit.rollout.engine.decode_step import DecodeStep

    model, tokenizer = tiny
    monkeypatch.setattr(DecodeStep, "capture", lambda self, run: run)
    params = SamplingParams(n=3, temperature=0.9, max_tokens=10, seed=7)
    plain = engine(model, tokenizer).generate(PROMPTS, params)
    graphed = engine(model, tokenizer)
    llm = graphed.engine
    llm.decode_step = DecodeStep(llm.decoder, 12, width=64, graphs=True)
    assert [c.token_ids for c in graphed.generate(PROMPTS, params)] == [c.token_ids for c in plain]
    assert (16, "draw") in llm.decode_step.graphs  # 12 running sequences, padded to the bucket of 16
    parts = llm.warmup()  # between requests, as a server may: every bucket captured, on padding rows only
    assert list(parts) == ["decode graphs", "packed prefill", "sampler"]  # no prefill graphs on the CPU
    assert all(seconds >= 0 for seconds in parts.values())
    assert sorted(llm.decode_step.graphs) == [(b, mode) for b in (2, 4, 8, 16) for mode in ("draw", "filter")]
    assert [c.token_ids for c in graphed.generate(PROMPTS, params)] == [c.token_ids for c in plain]
    # the other two variants: a filter sampled inside the step, a penalty sampled apart from the logits
    for other in (dataclasses.replace(params, top_p=0.8, top_k=20),
                  dataclasses.replace(params, repetition_penalty=1.5)):
        expected = [c.token_ids for c in engine(model, tokenizer).generate(PROMPTS, other)]
        assert [c.token_ids for c in graphed.generate(PROMPTS, other)] == expected
    assert (16, "logits") in llm.decode_step.graphs


def test_running_ahead_changes_no_token_and_leaks_no_block(tiny, monkeypatch):
    model, tokenizer = tiny
    # lengths that end at different steps, EOS free to end sequences early, a stop string, and a queue
    requests = [(p, SamplingParams(n=2, temperature=1.0, max_tokens=m, seed=5, stop=("the",) if m == 9 else ()))
                for p, m in zip(PROMPTS, (3, 9, 14, 6), strict=False)]

    def run(ahead: bool):
        if not ahead:
            monkeypatch.setattr(LLMEngine, "_can_run_ahead", lambda self: False)
        llm = LLMEngine(model, tokenizer, kv_cache_tokens=96, block_size=4, max_num_seqs=4)
        launched = []
        launch = llm._launch

        def counted(seqs):
            launched.append(len(seqs))
            return launch(seqs)

        monkeypatch.setattr(llm, "_launch", counted)
        handles = [llm.add_request(encode_prompt(tokenizer, p), params) for p, params in requests]
        while llm.has_work():
            llm.step()
        monkeypatch.undo()
        assert len(llm.blocks.free) == len(llm.blocks.refs)
        seqs = [seq for request in handles for seq in request.sequences]
        return [(s.output_ids, s.logprobs, s.finish_reason, s.text) for s in seqs], len(launched)

    ahead, launches = run(True)
    plain, plain_launches = run(False)
    # the same tokens, ends and texts; logprobs to fp32 rounding (a run-ahead step carries an ended sequence's
    # row, so its matmuls see another batch size, which CPU kernels block differently)
    assert [(ids, reason, text) for ids, _, reason, text in ahead] == [(i, r, t) for i, _, r, t in plain]
    assert [lp for _, lp, _, _ in ahead] == [pytest.approx(lp, abs=1e-5) for _, lp, _, _ in plain]
    assert launches > plain_launches  # it did run ahead: steps were launched that some ended sequences drop


def test_ended_sequences_are_retired_without_an_upload_and_arrivals_wait_for_seats(tiny, monkeypatch):
    # an eval's shape: more requests than seats, lengths that vary (~5% of tokens end a sequence here)
    from r1kit.rollout.engine import engine as engine_module

    model, tokenizer = tiny
    params = SamplingParams(n=2, temperature=1.0, max_tokens=40, seed=7)

    def run(max_num_seqs: int):
        gen = engine(model, tokenizer, max_num_seqs=max_num_seqs)
        gen.engine.eos_ids = set(range(0, len(tokenizer), 20))
        return [c.token_ids for c in gen.generate(PROMPTS * 6, params)], gen.engine.counts

    tokens, counts = run(32)
    assert tokens == run(64)[0]  # all 48 sequences at once: no queue, nothing retired early
    assert len({len(t) for t in tokens}) > 10 and counts.retired > 0
    # the first prefill seats 16 requests; the other 8 come in prefills that wait for 4 free seats (not 2)
    assert counts.prefill_steps <= 1 + 8 // 2
    monkeypatch.setattr(engine_module, "RETIRED_SHARE", 0.0)  # an upload whenever a sequence has ended
    uploading, every_end = run(32)
    assert uploading == tokens and every_end.retired == 0
    assert counts.reloads < every_end.reloads and counts.ran_ahead > every_end.ran_ahead


def test_rounds_run_into_each_other_and_each_draws_what_it_draws_alone(tiny):
    # an eval's rounds: the next round's prompts take the seats that this round's last sequences leave free
    model, tokenizer = tiny
    rounds = [(PROMPTS * 3, SamplingParams(n=2, temperature=1.0, max_tokens=40, seed=seed)) for seed in (7, 8, 9)]

    def generator():
        gen = engine(model, tokenizer, max_num_seqs=16)
        gen.engine.eos_ids = set(range(0, len(tokenizer), 20))  # lengths that vary, as an eval's do
        return gen

    alone = generator()
    each_alone = [[c.token_ids for c in alone.generate(prompts, params)] for prompts, params in rounds]
    gen = generator()
    together = [[c.token_ids for c in completions] for completions in gen.generate_rounds(rounds)]
    assert together == each_alone
    assert len({len(t) for t in together[0]}) > 5
    assert gen.engine.counts.decode_steps < alone.engine.counts.decode_steps  # no round drains to its longest
    # closed after the first round: the round queued behind it leaves the engine, with every block
    gen = generator()
    running = gen.generate_rounds(rounds)
    assert [c.token_ids for c in next(running)] == each_alone[0]
    running.close()
    assert not gen.engine.has_work() and len(gen.engine.blocks.free) == len(gen.engine.blocks.refs)
    # a round that cannot be queued (one prompt too long): the round before it still comes, then the error, and
    # none of the refused round's requests stays in the engine
    too_long = (["Hi", "word " * 600], rounds[1][1])
    running = gen.generate_rounds([rounds[0], too_long, rounds[2]])
    assert [c.token_ids for c in next(running)] == each_alone[0]
    with pytest.raises(ValueError, match="exceed the engine's context"):
        next(running)
    assert not gen.engine.has_work() and len(gen.engine.blocks.free) == len(gen.engine.blocks.refs)
    assert [c.token_ids for c in gen.generate(*rounds[1])] == each_alone[1]


def test_a_warm_engine_compiles_no_prefill_again(tokenizer):
    # a server prefills whatever arrives: after warmup() no prompt count or length may recompile (a stall
    # of seconds), including lengths that equal one of the model's dimensions (here 2 KV heads, 16 head_dim)
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    llm = LLMEngine(LlamaForCausalLM(config).eval(), tokenizer, kv_cache_tokens=1024, block_size=4)
    llm.decoder.compile_layers(prefill=True)
    llm.warmup()
    graphs = counters["stats"]["unique_graphs"]
    for lengths in ([2], [16], [64], [30, 2], [16, 16, 5], [3, 40, 9, 64, 2]):
        llm.decoder.prefill([[7] * n for n in lengths], [list(range(n)) for n in lengths])
    # chunks of longer prompts (a chunked prefill), alone and with whole prompts
    for lengths, ends in (([2], [16]), ([16], [64]), ([5, 5], [40, 5]), ([30, 2, 16], [30, 66, 16])):
        llm.decoder.prefill([[7] * n for n in lengths], [list(range(end)) for end in ends])
    assert counters["stats"]["unique_graphs"] == graphs


def test_arrivals_wait_to_be_prefilled_together(tiny):
    # a request arriving while others run waits prefill_delay x the last prefill's duration, so that several
    # arrivals share one prefill; nothing running, or the wait over, it is prefilled at once
    model, tokenizer = tiny
    llm = LLMEngine(model, tokenizer, kv_cache_tokens=512, block_size=4, prefill_delay=2.0)
    now = [0.0]
    llm.clock = lambda: now[0]
    params = SamplingParams(max_tokens=20, ignore_eos=True, seed=1)
    first = llm.add_request(encode_prompt(tokenizer, PROMPTS[0]), params)
    llm.step()
    assert llm.last_step == "prefill" and llm._prefill_s == 0.0  # the clock stood still: a free prefill
    llm._prefill_s = 0.5  # as if it had taken half a second
    late = [llm.add_request(encode_prompt(tokenizer, p), params) for p in PROMPTS[1:3]]
    kinds = []
    for tick in (0.4, 0.5, 0.9, 1.0, 1.0):  # due once the first arrival has waited 2.0 x 0.5 s
        now[0] = tick
        llm.step()
        kinds.append(llm.last_step)
    # at 1.0 the step launched ahead at 0.9 is recorded first, then the two arrivals share one prefill
    assert kinds == ["decode"] * 4 + ["prefill"]
    assert [len(s.output_ids) for r in [first, *late] for s in r.sequences] == [5, 1, 1]
    while llm.has_work():
        llm.step()
    assert all(len(s.output_ids) == 20 for r in [first, *late] for s in r.sequences)
    assert first.sequences[0].output_ids == engine(model, tokenizer).generate(PROMPTS[:1], params)[0].token_ids


def test_buffers_the_engine_owns_are_fused_and_give_the_models_tokens(tiny):
    # an engine in another dtype than the policy owns its buffers: q/k/v (with their biases) and gate/up
    # become one matmul each, views of one buffer that sync_weights() refreshes like any other
    model, tokenizer = tiny
    llm = LLMEngine(model, tokenizer, kv_cache_tokens=1024, block_size=4, dtype=torch.float64)
    lw = llm.decoder.layer_weights[0]
    assert lw.qkv is not None and lw.gate_up is not None
    assert (lw.qkv_bias is not None) == (lw.q_bias is not None)
    assert lw.q.data_ptr() == lw.qkv.data_ptr() and lw.up.data_ptr() == lw.gate_up[lw.gate.shape[0]:].data_ptr()
    wide = copy.deepcopy(model).double()
    greedy = SamplingParams(temperature=0, max_tokens=10)
    for prompt in PROMPTS[:2]:
        ids = encode_prompt(tokenizer, prompt)
        request = llm.add_request(ids, greedy)
        while llm.has_work():
            llm.step()
        assert request.sequences[0].output_ids == hf_greedy(wide, ids, 10, tokenizer.pad_token_id)[:10]
    with torch.no_grad():  # an optimizer step on the policy reaches the fused buffers at the next sync
        model.model.layers[0].self_attn.k_proj.weight.add_(0.5)
        llm.sync_weights()
        assert torch.equal(lw.k, model.model.layers[0].self_attn.k_proj.weight.double())
        model.model.layers[0].self_attn.k_proj.weight.sub_(0.5)


def test_shared_weights_are_fused_in_the_policy_itself(tiny, tmp_path):
    # sharing the policy's tensors, the engine makes its q/k/v and gate/up parameters views of one buffer
    # each: nothing copied, the model's outputs and checkpoint unchanged, a second engine finds them fused,
    # and an optimizer step on the policy is what both engines run next
    base, tokenizer = tiny
    model = copy.deepcopy(base)
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[1])])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(ids).logits
    first = LLMEngine(model, tokenizer, kv_cache_tokens=64).decoder.layer_weights[0]
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.weight.data_ptr() == first.qkv.data_ptr()
    assert attn.v_proj.weight.data_ptr() == first.qkv[first.q.shape[0] + first.k.shape[0]:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == first.gate_up[first.gate.shape[0]:].data_ptr()
    assert (attn.q_proj.bias is None) or attn.k_proj.bias.data_ptr() == first.qkv_bias[first.q.shape[0]:].data_ptr()
    second = LLMEngine(model, tokenizer, kv_cache_tokens=64).decoder.layer_weights[0]
    assert second.qkv.data_ptr() == first.qkv.data_ptr() and second.gate_up.data_ptr() == first.gate_up.data_ptr()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(state[k], reloaded[k]) for k in state)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for lw in (first, second):
        assert torch.equal(lw.k, attn.k_proj.weight) and torch.equal(lw.gate, mlp.gate_proj.weight)
    assert not torch.equal(attn.k_proj.weight, state["model.layers.0.self_attn.k_proj.weight"])


def test_a_sliding_window_caps_the_context(tokenizer):
    # the engine's kernels attend to the whole context: with the context capped at the window, that is what
    # the model's sliding-window attention computes; a longer request is refused, saying why
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=48)
    llm = LLMEngine(MistralForCausalLM(config).eval(), tokenizer, kv_cache_tokens=1024, block_size=4)
    assert llm.decoder.max_len == 48
    with pytest.raises(ValueError, match=r"10 prompt tokens \+ max_tokens 40 exceed the engine's context of 48 "
                                         r"tokens \(the model's sliding attention window"):
        llm.add_request(list(range(10)), SamplingParams(max_tokens=40))
    qwen2 = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=48)
    assert LLMEngine(Qwen2ForCausalLM(qwen2).eval(), tokenizer, kv_cache_tokens=1024).decoder.max_len == 512


def test_models_the_engine_cannot_run_are_refused_with_the_reason(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from r1kit.rollout.engine.model import unsupported

    def llama(**extra):
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, **extra)
        return LlamaForCausalLM(config).eval()

    assert unsupported(llama()) is None
    # an o_proj bias the forward would silently leave out: refused, naming it
    with pytest.raises(ValueError, match=r"no place for 2 of this model's parameters "
                                         r"\(model.layers.0.self_attn.o_proj.bias.*; use backend=hf"):
        LLMEngine(llama(attention_bias=True, mlp_bias=False), tokenizer, kv_cache_tokens=64)
    assert "activation is 'gelu'" in unsupported(llama(hidden_act="gelu"))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert unsupported(gpt2) == "the rollout engine runs llama, mistral, qwen2, qwen3 models, not 'gpt2'"


def test_kv_cache_takes_a_share_of_free_memory_and_no_more_than_the_batch_fills():
    from r1kit.rollout import kv_cache_tokens

    per_token = 2 * 30 * 3 * 64 * 2  # the embedded model in bf16: 30 layers, 3 KV heads of 64
    assert per_token == 23_040
    assert kv_cache_tokens(10**10, per_token, 256, 1024) == 3 * 10**9 // 23_040 == 130_208  # the share binds
    assert kv_cache_tokens(10**11, per_token, 256, 1024) == 256 * (1024 + 16) == 266_240  # the batch binds
    assert kv_cache_tokens(10**11, per_token, 256, None) == 3 * 10**10 // 23_040  # no bound known: the share
