import json

from r1kit.cli import main


def test_tasks_list_and_show(capsys):
    assert main(["tasks", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("arithmetic", "countdown", "gsm8k", "math500", "aime", "jsonl"))
    assert main(["tasks", "show", "countdown", "--rows", "1", "numbers=4"]) == 0
    assert "Using the numbers" in capsys.readouterr().out


def test_models_info_json(tiny_model_dir, capsys):
    assert main(["models", "info", str(tiny_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "LlamaForCausalLM" and len(info["sha256"]) == 64


def test_errors_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["models", "info", str(tmp_path / "nothing.gguf")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err
    assert main(["tasks", "show", "arithmetic", "foo=1"]) == 2
    assert "task 'arithmetic' has no option foo" in capsys.readouterr().err
