"""SFT: the assistant-only mask, packing against padding, data errors, a run and its exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1kit.config import SFTConfig
from r1kit.models import weights_sha256
from r1kit.prompts import REASONING_SYSTEM_PROMPT
from r1kit.sft.batch import IGNORE, collate, plan_micro_batches, token_nll
from r1kit.sft.data import Example, chat_segments, encode_segments, load_examples, row_segments
from r1kit.sft.run import run_sft
from r1kit.tasks import DataError

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n4"}]


def test_assistant_only_mask_on_a_hand_made_chat(tokenizer):
    ids, trainable = encode_segments(chat_segments(CHAT, tokenizer), tokenizer)
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(ids) == full
    # exactly the two assistant turns with their end-of-turn tokens, nothing of the prompts
    assert tokenizer.decode([t for t, m in zip(ids, trainable, strict=True) if m]) == \
        "Hello!<|im_end|>\n<think>\n2+2=4\n</think>\n4<|im_end|>\n"
    user_turn = tokenizer("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
                          add_special_tokens=False)["input_ids"]
    first_answer = tokenizer("Hello!<|im_end|>\n", add_special_tokens=False)["input_ids"]
    start = ids.index(first_answer[0])
    assert trainable[:start] == [False] * start
    assert trainable[start : start + len(first_answer)] == [True] * len(first_answer)
    after = start + len(first_answer)
    assert ids[after : after + len(user_turn)] == user_turn
    assert trainable[after : after + len(user_turn)] == [False] * len(user_turn)


def test_a_prompt_reasoning_answer_row_is_the_eval_prompt_then_the_trace(tokenizer):
    row = {"prompt": "What is 2+2?", "reasoning": " 2+2=4 ", "answer": "\\boxed{4}"}
    segments = row_segments(row, "chat", tokenizer)
    assert segments[0] == (tokenizer.apply_chat_template(
        [{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": "What is 2+2?"}],
        tokenize=False, add_generation_prompt=True), False)
    assert segments[1] == ("<think>\n2+2=4\n</think>\n\\boxed{4}<|im_end|>\n", True)
    no_reasoning = row_segments({**row, "reasoning": ""}, "chat_plain", tokenizer)
    assert no_reasoning[-1] == ("\\boxed{4}<|im_end|>\n", True)  # no empty <think> block made up
    plain = row_segments(row, "r1zero", tokenizer)
    assert plain[0][0].endswith("User: What is 2+2?. Assistant:")
    assert plain[1] == ("<think>\n2+2=4\n</think>\n\\boxed{4}" + tokenizer.eos_token, True)


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "q", "answer": "a"}', "data.jsonl:2: expected 'messages', or string fields prompt, reasoning "
     "and answer; missing reasoning (fields: prompt, answer)"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "data.jsonl:2: 'messages' has no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "q"}]}', "data.jsonl:2: 'messages' must be a list of"),
])
def test_bad_rows_name_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "q", "reasoning": "r", "answer": "a"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        load_examples(path, tokenizer, "chat", 512)
    assert str(e.value).startswith(str(tmp_path / message) if "/" in message else f"{tmp_path}/{message}")


def _examples(tokenizer) -> list[Example]:
    rows = [{"prompt": "What is 12 + 30?", "reasoning": "12 + 30 = 42.", "answer": "\\boxed{42}"},
            {"prompt": "Name a prime.", "reasoning": "Two is prime, and so is seven.", "answer": "7"},
            {"prompt": "Say hi", "reasoning": "Easy.", "answer": "hi there"}]
    return [Example(*encode_segments(row_segments(r, "chat", tokenizer), tokenizer)) for r in rows]


def _loss_and_grads(model, batches, targets):
    model.zero_grad()
    loss = sum(token_nll(model, b) for b in batches) / targets
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    examples = _examples(tokenizer)
    targets = sum(ex.target_tokens for ex in examples)
    cpu = torch.device("cpu")
    packed = collate(examples, True, tokenizer.pad_token_id, cpu)
    assert packed["input_ids"].shape == (1, sum(map(len, examples))) and "attention_mask" not in packed
    padded = collate(examples, False, tokenizer.pad_token_id, cpu)
    one_by_one = [collate([ex], False, tokenizer.pad_token_id, cpu) for ex in examples]
    loss_p, grads_p = _loss_and_grads(model, [packed], targets)
    for batches in ([padded], one_by_one):
        loss, grads = _loss_and_grads(model, batches, targets)
        torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, grads_p, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # by hand: the mean NLL of each sample's own next-token targets
    nll = 0.0
    for ex in examples:
        logits = model(torch.tensor([ex.input_ids])).logits[0].log_softmax(-1)
        for t in range(1, len(ex)):
            if ex.trainable[t]:
                nll -= logits[t - 1, ex.input_ids[t]].item()
    assert loss_p.item() == pytest.approx(nll / targets, rel=1e-5)


def test_a_samples_logits_do_not_change_when_another_is_packed_beside_it(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a, b = _examples(tokenizer)[:2]
    packed = collate([b, a], True, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone_a = model(torch.tensor([a.input_ids])).logits[0]
        alone_b = model(torch.tensor([b.input_ids])).logits[0]
    torch.testing.assert_close(together[len(b):], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[: len(b)], alone_b, rtol=1e-5, atol=1e-5)
    # targets never cross the boundary: b's last position predicts nothing
    assert packed["targets"][0, len(b) - 1].item() == IGNORE


def test_micro_batches_stay_within_their_token_budget():
    examples = [Example([1] * n, [True] * n) for n in (50, 40, 30, 30, 20, 10, 5)]
    packed = plan_micro_batches(examples, 64, packed=True)
    assert sorted(len(ex) for group in packed for ex in group) == sorted(map(len, examples))
    assert all(sum(map(len, group)) <= 64 for group in packed)
    # first-fit decreasing, by hand: 5 fits none of the three rows of 60
    assert [[len(ex) for ex in group] for group in packed] == [[50, 10], [40, 20], [30, 30], [5]]
    padded = plan_micro_batches(examples, 64, packed=False)
    assert all(len(group) * max(map(len, group)) <= 64 for group in padded)


def _traces(path, n=24):
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i} + {i}?", "reasoning": f"{i} + {i} = {2 * i}.",
                                "answer": f"\\boxed{{{2 * i}}}"}) + "\n")
    return path


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]


def test_a_run_trains_and_resumes_exactly(tiny_model_dir, tmp_path):
    data = _traces(tmp_path / "traces.jsonl")
    settings = dict(model=str(tiny_model_dir), data=str(data), eval_rows=4, batch_size=4, micro_batch_tokens=256,
                    steps=6, lr=1e-3, warmup_steps=1, eval_every=3, device="cpu")
    whole = run_sft(SFTConfig(**settings, out=str(tmp_path / "whole")))
    assert whole["after"]["eval/loss"] < whole["before"]["eval/loss"]
    assert whole["examples"] == 20 and whole["held_out"] == 4 and whole["steps"] == 6
    assert whole["final_sha256"] == weights_sha256(tmp_path / "whole" / "final")
    assert (tmp_path / "whole" / "report" / "curves.png").is_file()

    cut = tmp_path / "cut"
    first = run_sft(SFTConfig(**settings, out=str(cut), time_budget_s=1e-6))  # stops after one step
    assert first["steps"] == 1
    run_sft(SFTConfig(**settings, out=str(cut), resume="latest"))
    assert _losses(cut) == _losses(tmp_path / "whole")
    a, b = (load_file(run / "final" / "model.safetensors") for run in (tmp_path / "whole", cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_sft_writes_a_merged_model(tiny_model_dir, tmp_path):
    data = _traces(tmp_path / "traces.jsonl", 8)
    run_sft(SFTConfig(model=str(tiny_model_dir), data=str(data), eval_rows=0, batch_size=4, steps=2, lr=1e-2,
                      lora_r=4, gradient_checkpointing=True, device="cpu", out=str(tmp_path / "lora")))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = {k for k, _ in merged.named_parameters()}
    assert names == {k for k, _ in base.named_parameters()}  # a plain checkpoint: no adapter weights left
    changed = [k for k, p in merged.named_parameters() if not torch.equal(p, base.get_parameter(k))]
    assert any("q_proj" in k for k in changed)


def test_a_missing_model_fails_before_the_run_folder_exists(tmp_path):
    data = _traces(tmp_path / "traces.jsonl", 4)
    with pytest.raises(ValueError, match="is not a model"):
        run_sft(SFTConfig(model=str(tmp_path / "nope"), data=str(data), out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_that_finishes_is_not_reported_interrupted(tiny_model_dir, tmp_path, monkeypatch):
    import r1kit.sft.run as sft_run

    class StopAfterFirstStep:  # as a Ctrl-C during the first step would
        requested = True

        def restore(self):
            pass

    data = _traces(tmp_path / "traces.jsonl", 8)
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(data), eval_rows=0, batch_size=4, steps=3, device="cpu",
                    out=str(tmp_path / "run"))
    with monkeypatch.context() as patch:
        patch.setattr(sft_run, "StopRequest", StopAfterFirstStep)
        assert run_sft(cfg)["interrupted"] and not (tmp_path / "run" / "final").exists()
    resumed = run_sft(cfg.model_copy(update={"resume": "latest"}))
    assert not resumed["interrupted"] and resumed["steps"] == 3


def test_a_new_run_sets_an_earlier_one_aside_and_resume_continues_it(tiny_model_dir, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # rich would break the long paths
    data = _traces(tmp_path / "traces.jsonl", 8)
    out = tmp_path / "run"
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(data), eval_rows=0, batch_size=4, steps=1, device="cpu",
                    out=str(out))
    run_sft(cfg)
    (out / "stage.json").write_text("{}")  # a pipeline stage's record: not the run's, it stays
    capsys.readouterr()
    run_sft(cfg)
    (aside,) = tmp_path.glob("run.old-*")
    assert f"{out} held an earlier run: moved it to {aside} (resume=latest continues a run instead)" in (
        capsys.readouterr().err)
    for run in (out, aside):  # each run its own checkpoint, TensorBoard events, model and report
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-1"]
        assert len(list((run / "tensorboard").iterdir())) == 1
        assert all((run / name).exists() for name in ("config.yaml", "run.json", "metrics.jsonl", "final", "report"))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "final", "metrics.jsonl",
                                                     "report", "run.json", "stage.json", "tensorboard"]
    assert (out / "stage.json").read_text() == "{}" and not (aside / "stage.json").exists()

    run_sft(cfg.model_copy(update={"steps": 2, "resume": "latest"}))
    assert "earlier run" not in capsys.readouterr().err and len(list(tmp_path.glob("run.old-*"))) == 1
    assert [step for step, _ in _losses(out)] == [1, 2]


def test_several_trace_files_are_mixed_and_each_has_held_out_rows(tiny_model_dir, tmp_path, tokenizer):
    from r1kit.sft.run import split_examples

    a, b = _traces(tmp_path / "a.jsonl", 12), _traces(tmp_path / "b.jsonl", 4)
    cfg = SFTConfig(model=str(tiny_model_dir), data=[str(a), str(b)], eval_rows=4, device="cpu")
    train, held, too_long = split_examples(cfg, tokenizer)
    assert (len(train), len(held), too_long) == (12, 4, 0)
    assert [ex.line for ex in held] == [1, 5, 9, 1]  # rows 0, 4, 8 of a.jsonl and row 0 of b.jsonl
    summary = run_sft(cfg.model_copy(update={"steps": 1, "batch_size": 4, "out": str(tmp_path / "run")}))
    assert summary["examples"] == 12 and len(summary["data_sha256"]) == 2


def test_held_out_accuracy_on_a_task_during_sft(tiny_model_dir, tmp_path):
    from r1kit.eval.held_out import generated_rows

    data = _traces(tmp_path / "traces.jsonl", 8)
    held = generated_rows("addition", None, {}, {}, 3)
    with data.open("a") as f:  # a trace of a held-out question: never trained on
        f.write(json.dumps({"prompt": held.rows[1]["prompt"], "reasoning": "r", "answer": "a"}) + "\n")
    with pytest.warns(RuntimeWarning, match="1 training rows ask a held-out question of eval_task"):
        summary = run_sft(SFTConfig(model=str(tiny_model_dir), data=str(data), eval_rows=0, batch_size=4, steps=2,
                                    eval_every=1, eval_task="addition", eval_problems=3, eval_max_new_tokens=4,
                                    device="cpu", out=str(tmp_path / "run")))
    assert summary["examples"] == 8
    keys = {"eval/greedy_accuracy", "eval/sampled_accuracy", "eval/greedy_format_rate", "eval/sampled_length_mean"}
    assert keys <= set(summary["before"]) and keys <= set(summary["after"]) and "eval/loss" not in summary["after"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/greedy_accuracy" in r] == [0, 1, 2]


# as DeepSeek-R1's distilled models' templates: past and present assistant turns lose their reasoning, and the
# generation prompt opens the <think> block itself
R1_DISTILL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'].split('</think>')[-1] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")


def test_templates_that_drop_the_reasoning_still_train_on_it(tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = R1_DISTILL_TEMPLATE
    row = {"prompt": "What is 2+2?", "reasoning": "2+2=4", "answer": "\\boxed{4}"}
    assert row_segments(row, "chat_plain", tok) == [("<|User|>What is 2+2?<|Assistant|><think>\n", False),
                                                    ("2+2=4\n</think>\n\\boxed{4}<|end|>", True)]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "<think>r</think>a"}]}) + "\n")
    with pytest.raises(DataError, match=f"{path}:1: the model's chat template rewrites assistant turns"):
        load_examples(path, tok, "chat_plain", 512)


def test_resume_on_other_data_is_refused_and_final_keeps_the_base_precision(tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "bf16")
    cfg = SFTConfig(model=str(tmp_path / "bf16"), data=str(_traces(tmp_path / "a.jsonl", 8)), eval_rows=0,
                    batch_size=4, steps=2, device="cpu", out=str(tmp_path / "run"))
    run_sft(cfg)
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}  # trained in fp32, saved as the base was
    other = cfg.model_copy(update={"data": str(_traces(tmp_path / "b.jsonl", 6)), "resume": "latest", "steps": 3})
    with pytest.raises(ValueError, match="was trained from another data than this run's"):
        run_sft(other)


def test_no_training_row_left_is_an_error_not_a_hang(tiny_model_dir, tmp_path):
    from r1kit.eval.held_out import generated_rows

    held = generated_rows("addition", None, {}, {}, 2)
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "reasoning": "r", "answer": "a"}) + "\n"
                            for r in held.rows))
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(data), eval_rows=0, eval_task="addition", eval_problems=2,
                    device="cpu", out=str(tmp_path / "run"))
    with pytest.warns(RuntimeWarning), pytest.raises(DataError, match="no training row left"):
        run_sft(cfg)
