import json
import re
import shlex

import pytest

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


def test_tasks_show_takes_task_args_and_prints_the_options_in_effect(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text(json.dumps({"question": "Say yes", "answer": "yes"}) + "\n")
    for option in ("prompt_field=question", "task_args.prompt_field=question"):
        assert main(["tasks", "show", "jsonl", "--data", "mine.jsonl", option]) == 0
        out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
        assert "options: data=mine.jsonl, prompt_field=question, answer_field=answer, verifier=None" in out
        assert '"prompt": "Say yes"' in out
    assert main(["tasks", "show", "countdown", "--rows", "1", "task_args.numbers=4", "seed=3"]) == 0
    assert "options: n=100, numbers=4, max_number=50, seed=3\n" in capsys.readouterr().out  # not the defaults


def test_unknown_flag_prints_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--group-sise", "4"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: r1kit train [-h]")
    assert err.endswith("r1kit train: error: unrecognized arguments: --group-sise (did you mean --group-size?)\n")
    with pytest.raises(SystemExit):
        main(["tasks", "list", "extra"])
    assert capsys.readouterr().err.endswith("r1kit tasks list: error: unrecognized arguments: extra\n")


def test_unknown_key_names_the_close_one(capsys):
    assert main(["train", "group_sise=4"]) == 2
    assert capsys.readouterr().err == ("error: config (defaults and overrides): group_sise: unknown option; "
                                       "did you mean group_size?\n")


def test_every_example_in_the_help_parses_into_its_commands_config(monkeypatch):
    from pathlib import Path

    from r1kit.cli import EPILOG, build_parser
    from r1kit.config import config_from_args

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the examples name examples/*.yaml
    parser = build_parser()
    lines = [line.strip() for line in EPILOG.splitlines()[1:] if line.strip()]
    for line in lines:
        command, *what = re.split(r"\s{2,}", line)  # two spaces or more before the description
        args, extra = parser.parse_known_args(shlex.split(command)[1:])
        if hasattr(args, "config_cls"):
            args.overrides = [*args.overrides, *extra]
            config_from_args(args.config_cls, args)
        else:
            assert not extra, line
    demo_line = next(line for line in lines if line.startswith("r1kit demo "))
    assert "GRPO on addition" in demo_line and "arithmetic" not in demo_line  # it trains; it does not only evaluate
