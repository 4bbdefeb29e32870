"""Code tasks: the candidate's extraction, HumanEval, the user's JSONL (asserts, stdin/stdout), the generated
function problems, code_reward, and `r1kit eval --task humaneval` end to end. Candidates run in the sandbox."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from r1kit.eval.harness import evaluate, summarize
from r1kit.eval.held_out import HELD_OUT_SEED, generated_rows
from r1kit.rewards import build_rewards, code_reward, score_completions
from r1kit.rollout import Completion, SamplingParams
from r1kit.rollout.types import RoundByRound
from r1kit.sandbox import SandboxUnavailable, check_sandbox
from r1kit.tasks import DataError, load_task
from r1kit.tasks import code as code_module
from r1kit.tasks.code import TEMPLATES, CodeTask, last_code_block, same_program

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval.jsonl"
TINY_HUMANEVAL = [  # HumanEval's format, for machines without ../shared/data
    {"task_id": "Tiny/0", "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
     "    \"\"\" Sum of xs.\n    >>> total([1, 2])\n    3\n    \"\"\"\n", "entry_point": "total",
     "canonical_solution": "    return sum(xs)\n",
     "test": "\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"},
    {"task_id": "Tiny/1", "prompt": "def helper(s):\n    return s[::-1]\n\n\ndef twice(s: str) -> str:\n"
     "    \"\"\" s and s reversed. \"\"\"\n", "entry_point": "twice",
     "canonical_solution": "    return s + helper(s)\n",
     "test": "\n\ndef check(candidate):\n    assert candidate('ab') == 'abba'\n"},
]


@pytest.fixture(scope="module", autouse=True)
def sandbox_works():
    check_sandbox()  # fails the module with the setting to change when the kernel refuses


@pytest.fixture()
def humaneval_path(tmp_path) -> Path:
    if HUMANEVAL.is_file():
        return HUMANEVAL
    path = tmp_path / "humaneval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TINY_HUMANEVAL))
    return path


def fenced(code: str, tag: str = "python") -> str:
    return f"```{tag}\n{code}```"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- the candidate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, program", [
    ("Here:\n```python\nx = 1\n```\nDone.", "x = 1\n"),
    ("```\nx = 1\n```", "x = 1\n"),  # no language tag
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```python\nx = 1\n```\nor better\n```Python\nx = 2\n```", "x = 2\n"),  # the last block
    ("```python\nx = 1\n```\nOutput:\n```\n1\n```", "x = 1\n"),  # an untagged block after tagged code is output
    ("```python\nx = 1\n```\n```text\n1\n```", "x = 1\n"),  # so is one tagged as another language
    ("```\nx = 1\n```\n```\nx = 2\n```", "x = 2\n"),  # untagged only: the last
    ("Sure:\n```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # unclosed: runs to the end
    ("```python\nx = 1\n```\n```python\n   \n```", "x = 1\n"),  # an empty block is no candidate
    ("<think>try\n```python\nx = 1\n```\n</think>\n```python\nx = 2\n```", "x = 2\n"),  # after the reasoning
    ("<think>try\n```python\nx = 1\n```\n</think>\nThat is all.", None),  # code inside the reasoning only
    ("<think>still thinking\n```python\nx = 1\n```", None),  # reasoning never closed: no answer yet
    ("def f(): return 1", None),  # no fence
])
def test_candidate_is_the_last_fenced_python_block_after_the_reasoning(text, program):
    assert last_code_block(text) == program


def test_programs_equal_up_to_layout_and_comments_vote_together():
    assert same_program("def f(x):\n    return x+1  # one more\n", "def f(x):\n\n    return (x + 1)\n")
    assert not same_program("def f(x):\n    return x + 1\n", "def f(x):\n    return x + 2\n")
    assert same_program("    return x  # a body\n", "  return (x)")  # a completion-only body, as in a function
    assert same_program("def f(:\n  x", "def  f(:\n x") and not same_program("f(:", "g(:")  # no parse: by words


# --- HumanEval ----------------------------------------------------------------------------------------------


def test_humaneval_canonical_solutions_pass_and_none_fails(humaneval_path):
    task = load_task("humaneval", data=str(humaneval_path)).head(20)
    assert isinstance(task, CodeTask) and task.meta["cons_grouping"] == "normalised program text"
    row = task.rows[0]
    assert row["prompt"].startswith("Complete this Python function") and row["code_prompt"] in row["prompt"]
    assert row["answer"] == row["code_prompt"] + row["canonical_solution"]
    bodies = [fenced(r["canonical_solution"]) for r in task.rows]  # completion-only: continues the prompt
    whole = [f"<think>easy</think>\n{fenced(r['code_prompt'] + r['canonical_solution'])}" for r in task.rows]
    nones = [fenced(f"def {r['entry_point']}(*args):\n    return None\n") for r in task.rows]
    scores = task.reward(bodies + whole + nones, task.rows * 3)
    n = len(task.rows)
    assert scores == [1.0] * (2 * n) + [0.0] * n
    assert task.verify(bodies[0], row) == 1.0 and task.verify("no code", row) == 0.0


def test_humaneval_without_data_says_how(monkeypatch, tmp_path):
    monkeypatch.delenv("R1KIT_DATA", raising=False)
    with pytest.raises(DataError, match="task 'humaneval' needs its data: pass --data PATH"):
        load_task("humaneval")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"task_id": "x", "prompt": "def f():\n"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'test', 'entry_point'"):
        load_task("humaneval", data=bad)


# --- your own JSONL -----------------------------------------------------------------------------------------


def test_stdin_stdout_rows_compare_stripped_lines(tmp_path):
    data = write_jsonl(tmp_path / "io.jsonl", [{"prompt": "Add the two numbers on each line.",
                                                "inputs": ["1 2\n", ["3 4", "5 6"]], "outputs": ["3", "7\n11\n"]}])
    strict, lenient = load_task("code_jsonl", data=data), load_task("code_jsonl", data=data, partial=True)
    row = strict.rows[0]
    assert row["inputs"] == ["1 2\n", "3 4\n5 6"] and "reads standard input" in row["prompt"]
    adds = "import sys\nfor line in sys.stdin:\n    a, b = map(int, line.split())\n    print({})\n"
    texts = [fenced(adds.format("a + b")),
             fenced(adds.format("' ', a + b, '  '") + "print()\n"),  # other whitespace around the lines
             fenced(adds.format("a + b if a == 1 else 0")),  # right on one case of two
             fenced("raise SystemExit(3)\n")]
    assert strict.reward(texts, [row] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert lenient.reward(texts, [row] * 4) == [1.0, 1.0, 0.5, 0.0]


def test_assert_rows_with_partial_credit(tmp_path):
    data = write_jsonl(tmp_path / "asserts.jsonl", [
        {"prompt": "Write double(x).", "tests": [f"assert double({x}) == {2 * x}" for x in (1, 2, 3, 0)]},
        {"prompt": "Write double(x).", "tests": "assert double(1) == 2\nassert double(3) == 6", "solution": "..."},
    ])
    strict, lenient = load_task("code_jsonl", data=data), load_task("code_jsonl", data=data, partial=True)
    listed, one_string = strict.rows
    assert one_string["tests"] == ["assert double(1) == 2\nassert double(3) == 6"] and one_string["answer"] == "..."
    assert listed["prompt"] == "Write double(x).\n\nGive it in a ```python code block."
    wrong_on_zero = fenced("def double(x):\n    return 2 * x or 1\n")
    assert lenient.reward([wrong_on_zero, wrong_on_zero], [listed, one_string]) == [0.75, 1.0]
    assert strict.reward([wrong_on_zero], [listed]) == [0.0]
    bare = load_task("code_jsonl", data=data, instruction=False)
    assert bare.rows[0]["prompt"] == "Write double(x)."


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p"}, "a code row needs 'tests' \\(asserts\\) or 'inputs' and 'outputs'"),
    ({"prompt": "p", "tests": []}, "'tests' must be a string or a non-empty list"),
    ({"prompt": "p", "inputs": ["1"], "outputs": []}, "'inputs' and 'outputs' must be lists of the same"),
    ({"prompt": "p", "inputs": ["1"]}, "missing field 'outputs'"),
    ({"question": "p", "tests": "assert 1"}, "missing field 'prompt'"),
])
def test_bad_code_rows_name_file_and_line(tmp_path, row, message):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "ok", "tests": "assert True"}, row])
    with pytest.raises(DataError, match="rows.jsonl:2: " + message):
        load_task("code_jsonl", data=data)


# --- generated problems -------------------------------------------------------------------------------------


def one_row_per_template(rows: list[dict]) -> list[dict]:
    firsts = {}
    for row in rows:
        firsts.setdefault(row["function"], row)
    assert set(firsts) == {t.name for t in TEMPLATES}, "every template should appear in the first rows"
    return list(firsts.values())


def test_generated_problems_are_seeded_and_held_out_rows_are_new():
    task = load_task("functions", n=300, seed=0)
    assert task.rows == load_task("functions", n=300, seed=0).rows
    assert task.rows != load_task("functions", n=300, seed=1).rows
    held = generated_rows("functions", None, {"n": 300, "partial": True}, {"partial": False}, 64)
    assert len(held) == 64 and held.meta["seed"] == HELD_OUT_SEED and not held.meta["partial"]
    training = {row["prompt"] for row in task.rows}
    assert sum(row["prompt"] in training for row in held.rows) <= 64 // 10  # a few small templates may repeat
    assert all(len(row["tests"]) >= 2 and row["prompt"].endswith("```python code block.") for row in task.rows)
    # no problem's tests all expect one value, which a function returning a constant would pass
    assert all(len({test.rsplit(" == ", 1)[1] for test in row["tests"]}) > 1 for row in task.rows)


def test_every_templates_reference_passes_its_tests_and_a_wrong_one_fails():
    task = load_task("functions", n=300, seed=0)
    rows = one_row_per_template(task.rows)
    right = [fenced(row["answer"]) for row in rows]
    wrong = [fenced(row["answer"].replace("    ", "    return None\n    ", 1)) for row in rows]
    assert task.reward(right + wrong, rows * 2) == [1.0] * len(rows) + [0.0] * len(rows)


def test_a_batch_is_one_call_to_the_pool_and_head_keeps_the_batched_task(monkeypatch):
    calls = []
    real = code_module.score_many
    monkeypatch.setattr(code_module, "score_many", lambda jobs, **kw: calls.append(len(jobs)) or real(jobs, **kw))
    task = load_task("functions", n=8).head(4)
    assert isinstance(task, CodeTask) and len(task) == 4
    scores = task.reward([fenced(r["answer"]) for r in task.rows] + ["no code"], [*task.rows, task.rows[0]])
    assert scores == [1.0] * 4 + [0.0] and calls == [4]  # one pool for the batch; no job without a program


def test_a_refused_sandbox_fails_at_construction(monkeypatch):
    def refuse() -> None:
        raise SandboxUnavailable("the code sandbox (bubblewrap) could not start: set kernel.x=1")

    monkeypatch.setattr(code_module, "check_sandbox", refuse)
    with pytest.raises(SandboxUnavailable, match="set kernel.x=1"):
        load_task("functions", n=2)
    assert load_task("functions", n=2, unsafe_no_sandbox=True).meta["unsafe_no_sandbox"]


# --- code_reward --------------------------------------------------------------------------------------------


def test_code_reward_trl_style_batch_with_hung_and_crashing_candidates():
    double = "def double(x):\n    return 2 * x\n"
    he_prompt = "def double(x):\n    \"\"\" Twice x. \"\"\"\n"
    cases = [  # (completion, columns of its row, score)
        (fenced(double), {"tests": ["assert double(2) == 4", "assert double(0) == 0"]}, 1.0),
        ([{"role": "assistant", "content": fenced("print(int(input()) * 2)\n")}],
         {"inputs": ["4\n"], "outputs": ["8"]}, 1.0),
        (fenced("    return x + x\n"),
         {"test": "def check(candidate):\n    assert candidate(3) == 6\n", "entry_point": "double",
          "code_prompt": he_prompt}, 1.0),
        (fenced("def double(x):\n    while True:\n        pass\n"), {"tests": ["assert double(1) == 2"]}, 0.0),
        (fenced("import os\nos._exit(0)\n"), {"tests": ["assert double(1) == 2"]}, 0.0),
        (fenced("def double(x):\n    return 2 * x or 1\n"),
         {"tests": ["assert double(2) == 4", "assert double(0) == 0"]}, 0.5),  # partial credit
    ]
    names = ("tests", "inputs", "outputs", "test", "entry_point", "code_prompt")
    columns = {name: [row.get(name) for _, row, _ in cases] for name in names}  # absent: None, as in r1kit's rows
    started = time.monotonic()
    scores = code_reward([c for c, _, _ in cases], partial=True, timeout_s=1.0, prompts=["p"] * len(cases),
                         **columns)
    assert scores == [s for _, _, s in cases]
    assert time.monotonic() - started < 1.0 + 5.0  # the hung one costs its own time limit, not more
    assert code_reward([fenced(double)], tests=[["assert double(0) == 1"]]) == [0.0]


def test_code_reward_by_name_in_a_weighted_sum():
    rewards = build_rewards({"code": {"weight": 2.0, "partial": True}, "format": 0.5})
    completion = "<think>double it</think>\n" + fenced("def double(x):\n    return 2 * x or 1\n")
    scores = score_completions(rewards, [completion], {"tests": [["assert double(2) == 4", "assert double(0) == 0"]]})
    assert scores.total == [2.0 * 0.5 + 0.5] and not scores.failures
    with pytest.warns(RuntimeWarning, match="reward 'code' raised on 1 of 1 samples"):
        scores = score_completions(rewards, [completion], {"answer": ["4"]})  # no tests: a failure, scored 0
    assert scores.per_reward["code"] == [0.0] and scores.failures == {"code": 1}


# --- evaluation ---------------------------------------------------------------------------------------------


class ScriptedGenerator(RoundByRound):
    """Returns fixed texts, k per prompt."""

    def __init__(self, texts: list[list[str]]):
        self.texts = texts

    def generate(self, prompts, params, progress=None):
        return [Completion(text=t, token_ids=[1] * 3, finish_reason="stop", prompt_index=i)
                for i in range(len(prompts)) for t in self.texts.pop(0)]


def test_pass_at_k_and_cons_at_k_by_program(humaneval_path):
    task = load_task("humaneval", data=str(humaneval_path)).head(2)
    first, second = task.rows
    right = fenced(first["canonical_solution"])
    reformatted = fenced(first["canonical_solution"].replace("\n", "  # same\n"))
    none = fenced(f"def {second['entry_point']}(*args):\n    return None\n")
    generator = ScriptedGenerator([[right, reformatted, fenced("    return 0\n"), "no code"],
                                   [none, none, fenced(second["canonical_solution"]), "no code"]])
    run = evaluate(task, generator, tokenizer=None, params=SamplingParams(n=4), template="raw", chunk=2)
    m = summarize(run.records, 4, task.same_answer, 1.0, task.meta["cons_grouping"])
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["pass@4"] == 1.0 and m["cons_grouping"] == "normalised program text"
    assert m["cons@4"] == pytest.approx((1.0 + 0.0) / 2)  # the two right programs are one vote; two Nones win
    assert run.records[3]["extracted"] is None and run.records[0]["gold"] == first["answer"]


def test_eval_command_on_humaneval(tiny_model_dir, humaneval_path, tmp_path):
    from r1kit.cli import main

    out = tmp_path / "run"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "humaneval", "--data", str(humaneval_path),
                 "--limit", "2", "--samples", "2", "--max-new-tokens", "8", "--device", "cpu",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["name"] == "humaneval" and results["task"]["rows"] == 2
    assert results["task"]["data"] == str(humaneval_path) and results["task"]["timeout_s"] == 5.0
    metrics = results["metrics"]
    assert metrics["problems"] == 2 and metrics["samples_per_problem"] == 2
    assert metrics["pass@1"] == 0.0 and metrics["pass@2"] == 0.0 and metrics["cons@2"] == 0.0  # a random model
    assert metrics["cons_grouping"] in ("normalised program text", "final text")  # the latter when no code at all
    assert results["reward_failures"] == {}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and samples[0]["problem"] == load_task(
        "humaneval", data=str(humaneval_path)).rows[0]["task_id"]


def test_train_code_example_trains_partial_and_holds_out_strict():
    from r1kit.config import TrainConfig, load_config
    from r1kit.rl.run import build_tasks

    example = Path(__file__).resolve().parents[1] / "examples" / "train_code.yaml"
    cfg = load_config(TrainConfig, example, {"task_args": {"n": 200}, "eval_problems": 16})
    assert cfg.task == "functions" and cfg.template == "chat_plain" and cfg.dynamic_sampling
    train, held = build_tasks(cfg)
    assert isinstance(train, CodeTask) and isinstance(held, CodeTask)
    assert train.scoring.partial and not held.scoring.partial and held.meta["seed"] == HELD_OUT_SEED
    assert not {r["prompt"] for r in held.rows} & {r["prompt"] for r in train.rows}
