import json
import sys

import pytest

from r1kit.tasks import DataError, load_task, read_jsonl, task_options
from r1kit.tasks.countdown import check_equation, countdown_verify
from r1kit.tasks.expr import evaluate


def test_arithmetic_is_seeded_and_verified():
    a, b = load_task("arithmetic", n=5, seed=7), load_task("arithmetic", n=5, seed=7)
    assert a.rows == b.rows and a.rows != load_task("arithmetic", n=5, seed=8).rows
    for row in load_task("arithmetic", n=50, digits=2, ops="+-*/", terms=3).rows:
        value, _ = evaluate(row["expression"])
        assert value == int(row["answer"])
        assert a.verify(f"<think>...</think> \\boxed{{{row['answer']}}}", row) == 1.0
        assert a.verify(f"\\boxed{{{int(row['answer']) + 1}}}", row) == 0.0


def test_arithmetic_rejects_bad_options():
    with pytest.raises(ValueError, match="ops must be made of"):
        load_task("arithmetic", ops="+^")
    with pytest.raises(ValueError, match="task 'arithmetic' has no option foo; its options: n, digits"):
        load_task("arithmetic", foo=1)


def test_countdown_rows_are_solvable_and_verified():
    task = load_task("countdown", n=20, numbers=3, seed=1)
    row = {"numbers": [3, 5, 7], "target": 22}
    assert countdown_verify("<think>..</think><answer> 3 * 5 + 7 </answer>", row) == 1.0
    assert countdown_verify("<answer>(7 + 5) * 3 - 14 = 22</answer>", row) == 0.0  # 14 not given
    assert countdown_verify("\\boxed{3 \\times 5 + 7}", row) == 1.0
    assert countdown_verify("<answer>3 * 5 + 7 = 22</answer>", row) == 1.0
    assert countdown_verify("<answer>3 * 5 + 8</answer>", row) == 0.0
    assert countdown_verify("no answer", row) == 0.0
    assert all(r["target"] >= 1 and len(r["numbers"]) == 3 for r in task.rows)


@pytest.mark.parametrize("equation, message", [
    ("__import__('os').system('echo hacked')", "found Call"),
    ("(5 + 5) * 3 - 7", "uses numbers not given \\(or reused\\): \\[5\\]"),
    ("3 * 5 + 9", "uses numbers not given \\(or reused\\): \\[9\\]"),
    ("3 ** 5", "found BinOp"),
    ("-3 + 5 * 7", "found UnaryOp"),
    ("3.0 * 5 + 7", "found Constant"),
    ("7 / (5 - 5)", "division by zero"),
    ("x + 3", "found Name"),
    ("3 +", "not an arithmetic expression"),
    ("(" * 150 + "3" + ")" * 150, "longer than 200 characters"),
])
def test_countdown_rejects_unsafe_or_invalid(equation, message):
    with pytest.raises(ValueError, match=message):
        check_equation(equation, [3, 5, 7], 22)
    assert countdown_verify(f"<answer>{equation}</answer>", {"numbers": [3, 5, 7], "target": 22}) == 0.0


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": 2\n')
    with pytest.raises(DataError, match=f"^{path}:3: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "a", "answer": "1"}\n[1, 2]\n')
    with pytest.raises(DataError, match=f"^{path}:2: expected a JSON object, got list$"):
        read_jsonl(path)
    path.write_text('{"question": "a", "answer": "1"}\n')
    with pytest.raises(DataError, match=f"^{path}:1: missing field 'prompt' \\(fields: question, answer\\)$"):
        load_task("jsonl", data=str(path))


def test_jsonl_task_with_field_mapping_and_custom_verifier(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"q": f"Say {w}", "gold": w}) + "\n" for w in ["yes", "no"]))
    verifier = tmp_path / "my_verifier.py"
    verifier.write_text("def verify(completion, row):\n    return completion.strip().lower() == row['gold']\n")
    task = load_task("jsonl", data=str(path), prompt_field="q", answer_field="gold",
                     verifier=f"{verifier}:verify")
    assert [r["prompt"] for r in task.rows] == ["Say yes", "Say no"]
    assert task.verify(" YES", task.rows[0]) == 1.0 and task.verify("yes", task.rows[1]) == 0.0
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_task("jsonl", data=str(path), prompt_field="q", answer_field="gold", verifier=f"{verifier}:nope")
    with pytest.raises(ValueError, match="verifier must be 'module:function'"):
        load_task("jsonl", data=str(path), prompt_field="q", answer_field="gold", verifier="nocolon")


@pytest.mark.parametrize("name, file", [("gsm8k", "gsm8k_test.jsonl"), ("math500", "math500_test.jsonl"),
                                        ("aime", "aime24.jsonl")])
def test_benchmarks_load_and_grade_their_own_gold(name, file, data_dir):
    task = load_task(name, data=str(data_dir / file)).head(25)
    assert task.rows and all(r["prompt"] and r["answer"] for r in task.rows)
    for row in task.rows:
        assert task.verify(f"<think>solved</think> The answer is \\boxed{{{row['answer']}}}.", row) == 1.0


def test_benchmark_without_data_says_how(monkeypatch):
    monkeypatch.delenv("R1KIT_DATA", raising=False)
    with pytest.raises(DataError, match="task 'gsm8k' needs its data: pass --data PATH"):
        load_task("gsm8k")
    with pytest.raises(ValueError, match="takes no data file"):
        load_task("arithmetic", data="x.jsonl")
    assert task_options("countdown") == {"n": 100, "numbers": 3, "max_number": 50, "seed": 0}


def test_verifier_module_is_found_in_the_working_directory(tmp_path, monkeypatch):
    # the console script's sys.path has no working directory; `python -m` would find the module there
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r1kit_cwd_verifier.py").write_text("def check(completion, row):\n    return 1\n")
    monkeypatch.delitem(sys.modules, "r1kit_cwd_verifier", raising=False)
    from r1kit.tasks.datasets import import_function

    assert import_function("r1kit_cwd_verifier:check")("x", {}) == 1
    assert str(tmp_path) not in sys.path  # looked there for this import only
    monkeypatch.delitem(sys.modules, "r1kit_cwd_verifier")
    with pytest.raises(ValueError, match="^verifier 'no_such_module:check': cannot import 'no_such_module' "
                       "\\(No module named 'no_such_module'\\); not in the working directory either; "
                       "a file works too: path/to/file.py:check$"):
        import_function("no_such_module:check")
    (tmp_path / "broken_import.py").write_text("import no_such_dependency\n")
    with pytest.raises(ValueError, match="^verifier 'broken_import:check': cannot import 'broken_import' "
                       "\\(No module named 'no_such_dependency'\\)$"):  # found, so no hint about the file
        import_function("broken_import:check")


def test_addition_grades_by_its_own_rules_not_math_verify():
    lenient, strict = load_task("addition", n=1, seed=3), load_task("addition", n=1, seed=3, strict=True)
    row = lenient.rows[0]
    total = int(row["answer"])
    assert lenient.verify(f"so it is {total}", row) == 1.0
    assert lenient.verify(f"\\boxed{{{total}}} and 1", row) == 0.0  # the last integer counts
    assert strict.verify(f"Answer: {total}", row) == 1.0
    assert strict.verify(f"Answer: {total} (not {total + 1})", row) == 1.0  # the first integer after the marker
    assert strict.verify(f"\\boxed{{{total}}}", row) == 0.0  # no marker, no credit
    assert strict.extract(f"Answer: {total}", row) == str(total)
