"""Rejection sampling: the filters by hand, exactly the verified rows kept, cold-start traces, SIGKILL and resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from r1kit.config import FilterConfig, SampleConfig
from r1kit.models import weights_sha256
from r1kit.sample.filters import Candidate, judge, repetition_loop
from r1kit.sample.run import progress_path, run_sample

GOOD = "<think>\nSix times seven is forty-two.\n</think>\n\\boxed{42}"


def test_judge_keeps_exactly_the_verified_traces_that_pass_every_filter():
    loop = "<think>\n" + "so we add the two numbers again " * 5 + "\n</think>\n\\boxed{42}"
    candidates = [
        Candidate(GOOD, 1.0, 20, "stop"),                                                   # kept
        Candidate(GOOD.replace("42", "41"), 0.0, 20, "stop"),                              # wrong answer
        Candidate("Six times seven is forty-two. \\boxed{42}", 1.0, 12, "stop"),            # no <think>
        Candidate("<think>\n六乘以七等于四十二 six seven\n</think>\n\\boxed{42}", 1.0, 20, "stop"),  # mixed script
        Candidate(GOOD, 1.0, 300, "stop"),                                                 # too long
        Candidate(GOOD, 1.0, 20, "length"),                                                # cut at the limit
        Candidate(loop, 1.0, 60, "stop"),                                                  # repetition loop
        Candidate(GOOD.replace("\n", "  \n").replace("Six", "SIX"), 1.0, 20, "stop"),       # duplicate of the first
        Candidate("<think>\n6 x 7 = 42.\n</think>\n\\boxed{42}", 1.0, 20, "stop"),          # kept
    ]
    verdicts = judge(candidates, "What is six times seven?", FilterConfig(), min_reward=1.0, max_tokens=256)
    assert verdicts == [None, "unverified", "format", "language", "length", "length", "repetition", "duplicate", None]
    capped = judge(candidates, "What is six times seven?", FilterConfig(keep_per_prompt=1), 1.0, 256)
    assert capped[0] is None and capped[-1] == "over_limit"
    relaxed = FilterConfig(require_format=False, min_language=0.0, dedup=False, repeat_times=100)
    assert judge(candidates[1:4], "q", relaxed, 1.0, 256) == ["unverified", None, None]


def test_repetition_loop_counts_runs_of_words():
    assert repetition_loop("a b c " * 4, ngram=3, times=4)
    assert not repetition_loop("a b c " * 3, ngram=3, times=4)
    assert not repetition_loop("short", ngram=8, times=4)


def _task_file(path: Path, golds: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Question {i}: what is 2 + 2?", "gold": g}) + "\n"
                            for i, g in enumerate(golds)))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_local_teacher_keeps_exactly_the_verified_rows(scripted_dir, tmp_path):
    # the scripted model always answers 4; half the golds are 4
    data = _task_file(tmp_path / "task.jsonl", ["4", "5", "4", "4", "7", "4"])
    cfg = SampleConfig(teacher=str(scripted_dir), task="jsonl", data=str(data), samples=2, max_new_tokens=32,
                       task_args={"prompt_field": "question", "answer_field": "gold"}, chunk=4, device="cpu",
                       filters=FilterConfig(require_format=False, dedup=False), out=str(tmp_path / "out.jsonl"))
    counts = run_sample(cfg)
    rows = _rows(tmp_path / "out.jsonl")
    assert [(r["id"], r["sample"]) for r in rows] == [(f"q{i}", j) for i in (0, 2, 3, 5) for j in (0, 1)]
    assert counts == {**counts, "generated": 12, "kept": 8, "rejected_unverified": 4}
    row = rows[0]
    assert (row["reasoning"], row["answer"], row["gold"], row["reward"]) == (
        "Two plus two makes four", "The answer is 4.", "4", 1.0)
    assert row["teacher_sha256"] == weights_sha256(scripted_dir) and row["teacher"] == str(scripted_dir)
    assert row["sampling"]["n"] == 2 and row["sampling"]["temperature"] == 0.6 and row["sampling"]["max_tokens"] == 32
    # de-duplication: the scripted model says the same thing twice, so one trace per prompt is left
    dedup = run_sample(cfg.model_copy(update={"filters": FilterConfig(require_format=False),
                                              "out": str(tmp_path / "dedup.jsonl")}))
    assert dedup["kept"] == 4 and dedup["rejected_duplicate"] == 4


def test_cold_start_traces_from_worked_solutions(tmp_path):
    source = SHARED_DATA / "gsm8k_train.jsonl"
    if not source.is_file():
        source = tmp_path / "gsm8k_train.jsonl"
        source.write_text(json.dumps({"id": "t0", "problem": "Tom has 3 apples and buys 4. How many?", "answer": "7",
                                      "solution": "He has 3+4=<<3+4=7>>7 apples."}) + "\n")
    cfg = SampleConfig(teacher="solutions", task="gsm8k", data=str(source), limit=50, out=str(tmp_path / "cs.jsonl"))
    counts = run_sample(cfg)
    rows = _rows(tmp_path / "cs.jsonl")
    first = json.loads(source.read_text().splitlines()[0])
    assert rows[0]["answer"] == f"\\boxed{{{first['answer']}}}" and rows[0]["teacher"] == "solutions"
    assert "<<" not in rows[0]["reasoning"] and rows[0]["reasoning"] in first["solution"].replace("\n", "\n")
    assert counts["generated"] == min(50, len(source.read_text().splitlines())) and counts["rejected_unverified"] == 0
    assert all(r["reward"] == 1.0 for r in rows)


def test_a_missing_solution_field_names_file_and_line(tmp_path):
    data = _task_file(tmp_path / "task.jsonl", ["4"])
    cfg = SampleConfig(teacher="solutions", task="jsonl", data=str(data), out=str(tmp_path / "o.jsonl"),
                       task_args={"prompt_field": "question", "answer_field": "gold"})
    with pytest.raises(ValueError, match=f"{data}:1: teacher 'solutions' needs a 'solution' field"):
        run_sample(cfg)


def test_other_settings_or_a_foreign_file_are_not_overwritten(scripted_dir, tmp_path):
    data = _task_file(tmp_path / "task.jsonl", ["4", "4"])
    cfg = SampleConfig(teacher=str(scripted_dir), task="jsonl", data=str(data), samples=1, max_new_tokens=32,
                       task_args={"prompt_field": "question", "answer_field": "gold"}, device="cpu",
                       filters=FilterConfig(require_format=False), out=str(tmp_path / "out.jsonl"))
    run_sample(cfg)
    with pytest.raises(ValueError, match="was written with other settings"):
        run_sample(cfg.model_copy(update={"samples": 3}))
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("{}\n")
    with pytest.raises(ValueError, match="has no notes.jsonl.progress.json"):
        run_sample(cfg.model_copy(update={"out": str(foreign)}))


ACCEPT_ALL = "def accept(completion, row):\n    return 1.0\n"


@pytest.fixture(scope="module")
def babbler_dir(tmp_path_factory, tokenizer) -> Path:
    """A 1-layer random Llama that says only ' yes', ' no', ' maybe' or ' four' and stops at random: some
    samples end, others run to the length limit (and are not kept), depending on every seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    words = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" yes", " no", " maybe", " four")]
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[words] = torch.randn(len(words), 64) * 3
        model.lm_head.weight[tokenizer.eos_token_id] = torch.randn(64) * 3
    folder = tmp_path_factory.mktemp("babbler")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _kill_config(teacher_dir, tmp_path: Path, name: str) -> Path:
    verifier = tmp_path / "accept.py"
    verifier.write_text(ACCEPT_ALL)
    data = _task_file(tmp_path / "task.jsonl", [str(i) for i in range(24)])
    cfg = SampleConfig(teacher=str(teacher_dir), task="jsonl", data=str(data), samples=2, max_new_tokens=32,
                       temperature=1.0, chunk=1, device="cpu", out=str(tmp_path / f"{name}.jsonl"),
                       task_args={"prompt_field": "question", "answer_field": "gold",
                                  "verifier": f"{verifier}:accept"},
                       filters=FilterConfig(require_format=False, min_language=0.0, repeat_times=1000, dedup=False))
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return path


def test_sigkill_then_rerun_gives_the_rows_of_an_uninterrupted_run(babbler_dir, tmp_path):
    command = [sys.executable, "-m", "r1kit.cli", "sample", "--config"]
    whole = _kill_config(babbler_dir, tmp_path, "whole")
    subprocess.run([*command, str(whole)], check=True, capture_output=True)
    cut = _kill_config(babbler_dir, tmp_path, "cut")
    out = tmp_path / "cut.jsonl"
    proc = subprocess.Popen([*command, str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (progress_path(out).is_file() and json.loads(progress_path(out).read_text())["rounds"] >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(progress_path(out).read_text())["rounds"] < 24
    # a half-written row, as a kill in the middle of a write leaves it
    with out.open("a") as f:
        f.write('{"prompt": "Question 99')
    subprocess.run([*command, str(cut)], check=True, capture_output=True)
    expected = (tmp_path / "whole.jsonl").read_text()
    assert out.read_text() == expected
    kept = [(r["id"], r["sample"]) for r in _rows(out)]
    assert 5 <= len(kept) <= 43 and len(set(kept)) == len(kept)


def test_an_output_cut_or_deleted_after_its_progress_is_not_padded(tmp_path):
    source = _task_file(tmp_path / "task.jsonl", ["4", "5"])
    for row in (rows := [json.loads(line) for line in source.read_text().splitlines()]):
        row["solution"] = "2 + 2 = 4"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SampleConfig(teacher="solutions", task="jsonl", data=str(source), out=str(tmp_path / "o.jsonl"),
                       task_args={"prompt_field": "question", "answer_field": "gold"})
    run_sample(cfg)
    (tmp_path / "o.jsonl").unlink()
    with pytest.raises(ValueError, match="o.jsonl is shorter than o.jsonl.progress.json records"):
        run_sample(cfg)
    assert not (tmp_path / "o.jsonl").exists()
