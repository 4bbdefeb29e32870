import json

import pytest

from r1kit.cli import main
from r1kit.eval.harness import evaluate, summarize
from r1kit.models import weights_sha256
from r1kit.rollout import Completion, SamplingParams
from r1kit.rollout.types import RoundByRound
from r1kit.tasks import Task


class ScriptedGenerator(RoundByRound):
    """Returns fixed texts, k per prompt, so metrics can be checked by hand."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, params, progress=None):
        out = []
        for i in range(len(prompts)):
            for text in self.texts.pop(0):
                out.append(Completion(text=text, token_ids=[1] * len(text), finish_reason="stop", prompt_index=i))
        return out


def test_metrics_by_hand():
    task = Task("toy", [{"id": 0, "prompt": "1+1?", "answer": "2"}, {"id": 1, "prompt": "half?", "answer": "0.5"}])
    generator = ScriptedGenerator([
        ["<think>a</think> \\boxed{2}", "\\boxed{3}", "\\boxed{3}", "<think>b 二 二</think> \\boxed{2}"],
        ["\\boxed{\\frac{1}{2}}", "\\boxed{1/2}", "<think>c</think> \\boxed{0.25}", "no answer"],
    ])
    run = evaluate(task, generator, tokenizer=None, params=SamplingParams(n=4), template="raw", chunk=1)
    m = summarize(run.records, 4, task.same_answer, generation_s=2.0)
    assert m["pass@1"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert m["pass@2"] == pytest.approx(1 - 1 / 6)  # per problem 1 - C(2,2)/C(4,2)
    assert m["pass@4"] == 1.0
    assert m["cons@4"] == pytest.approx((0.5 + 1.0) / 2)  # 2 vs 3 tie; 1/2 wins 2 to 1
    assert m["format_rate"] == pytest.approx(3 / 8)
    # every reasoning is in the prompt's script but one: "b 二 二" has one Latin word of three
    assert m["language_consistency"] == pytest.approx((7 + 1 / 3) / 8)
    assert m["truncation_rate"] == 0.0
    assert m["tokens_per_s"] == pytest.approx(sum(len(r["completion"]) for r in run.records) / 2.0)
    assert [r["extracted"] for r in run.records[4:]] == ["\\frac{1}{2}", "\\frac{1}{2}", "0.25", None]
    assert m["cons_grouping"] == "extracted answers"


def test_cons_at_k_votes_on_the_final_text_when_the_task_extracts_nothing():
    # a verifier of the user's own: yes/no answers, nothing math-verify would extract
    task = Task("yesno", [{"id": 0, "prompt": "Is 7 prime?", "answer": "yes"}],
                verify=lambda c, row: float(c.strip().lower().endswith("yes")), extract=lambda c, row: None)
    generator = ScriptedGenerator([["<think>a</think> Yes", "<think>b</think>  yes ", "No", "<think>c</think> yes"]])
    run = evaluate(task, generator, tokenizer=None, params=SamplingParams(n=4), template="raw", chunk=1)
    m = summarize(run.records, 4, task.same_answer, generation_s=1.0)
    assert m["pass@1"] == 0.75 and m["cons_grouping"] == "final text"
    assert m["cons@4"] == 1.0  # "yes" wins three to one (with nothing extracted, it scored 0 before)


def test_eval_command_writes_results_samples_and_summary(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["eval", "--model", str(tiny_model_dir), "--task", "arithmetic", "--samples", "2",
                 "--max-new-tokens", "6", "--out", str(out), "--device", "cpu", "task_args.n=3",
                 "--temperature", "0.6"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["sha256"] == weights_sha256(tiny_model_dir)
    assert results["sampling"]["n"] == 2 and results["sampling"]["temperature"] == 0.6
    assert results["sampling"]["top_p"] == 0.95 and results["sampling"]["max_tokens"] == 6
    assert results["task"] == {"name": "arithmetic", "rows": 3, "digits": 2, "ops": "+-*", "terms": 2, "seed": 0}
    assert results["r1kit_version"] and not results["interrupted"]
    timings = results["timings"]
    assert timings["generation_s"] == results["metrics"]["generation_s"] and timings["scoring_s"] > 0
    assert timings["load_s"] + timings["generation_s"] + timings["scoring_s"] < results["wall_s"]
    assert {"pass@1", "pass@2", "cons@2", "format_rate", "truncation_rate", "tokens_per_s"} <= set(results["metrics"])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    assert set(samples[0]) >= {"prompt", "completion", "reasoning", "answer", "extracted", "rewards", "gold"}
    assert set(samples[0]["rewards"]) == {"accuracy", "format", "tag_count", "language"}
    assert "model sha256" in (out / "summary.md").read_text()


def test_eval_backends_agree(tiny_model_dir, tmp_path):
    runs = {}
    for backend in ("hf", "engine"):
        assert main(["eval", "--model", str(tiny_model_dir), "--task", "arithmetic", "--samples", "3",
                     "--max-new-tokens", "8", "--out", str(tmp_path / backend), "--device", "cpu", "task_args.n=4",
                     "--backend", backend]) == 0
        runs[backend] = [json.loads(line)["completion"] for line in (tmp_path / backend / "samples.jsonl").open()]
    assert runs["hf"] == runs["engine"]
    # the engine says where its time went: one prefill of the 4 prompts, then a decode step for each further token
    results = {b: json.loads((tmp_path / b / "results.json").read_text()) for b in runs}
    counts, longest = results["engine"]["engine_steps"], results["engine"]["metrics"]["response_tokens"]["max"]
    assert counts["prefill_steps"] == 1 and counts["decode_steps"] == longest - 1 and counts["reloads"] >= 1
    assert "engine_steps" not in results["hf"]


def test_eval_command_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--task", "arithmetic", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["eval", "--samples", "0"]) == 2
    assert "samples: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_an_engine_eval_draws_the_same_samples_in_rounds_of_any_size(tiny_model_dir):
    # the engine runs the next round while this one ends: rounds of 2 rows, of 3, or one of all 7 must draw the
    # same completions for each row (each sampled as its place in one request over the whole task)
    from r1kit.models import load_model
    from r1kit.rollout.engine import EngineGenerator
    from r1kit.tasks import load_task

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    task = load_task("arithmetic", n=7)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3)

    def completions(chunk: int) -> list[str]:
        generator = EngineGenerator(model, tokenizer, kv_cache_tokens=2048, block_size=4, max_num_seqs=4)
        run = evaluate(task, generator, tokenizer, params, template="raw", chunk=chunk)
        assert not generator.engine.has_work()
        return [(r["problem"], r["sample"], r["completion"]) for r in run.records]

    whole = completions(7)
    assert len(whole) == 14 and len({c for _, _, c in whole}) > 7
    assert completions(2) == whole and completions(3) == whole


def test_rounds_scored_in_a_process_of_their_own_give_the_same_records_in_order(tiny_model_dir, caplog):
    # on a GPU the eval grades a round in another process while the next one generates: the records must be the
    # ones scoring here gives, in row order; a task that does not pickle is scored here instead, and says so
    from r1kit.models import load_model
    from r1kit.rollout.engine import EngineGenerator
    from r1kit.tasks import load_task

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    task = load_task("arithmetic", n=7)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3)

    def records(task: Task, background: bool) -> list[dict]:
        generator = EngineGenerator(model, tokenizer, kv_cache_tokens=2048, block_size=4, max_num_seqs=4)
        return evaluate(task, generator, tokenizer, params, template="raw", chunk=2, background=background).records

    here = records(task, background=False)
    assert len(here) == 14 and [r["problem"] for r in here] == [p for p in range(7) for _ in range(2)]
    assert records(task, background=True) == here
    unpicklable = task.with_rows(task.rows)
    unpicklable.verify = lambda text, row: 1.0
    with caplog.at_level("INFO", logger="r1kit"):
        scored_here = records(unpicklable, background=True)
    assert [r["rewards"]["accuracy"] for r in scored_here] == [1.0] * 14
    assert "scoring in this process: the task does not pickle" in caplog.text
