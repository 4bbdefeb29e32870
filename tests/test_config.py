import argparse

import pytest

from r1kit.config import ConfigError, EvalConfig, add_config_arguments, config_from_args, parse_overrides


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EvalConfig)
    return config_from_args(EvalConfig, parser.parse_args(argv))


def test_defaults_follow_the_paper():
    cfg = EvalConfig()
    assert (cfg.temperature, cfg.top_p, cfg.samples, cfg.model) == (0.6, 0.95, 4, "default")


def test_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("task: math500\nsamples: 8\ntemperature: 0.7\ntask_args:\n  n: 5\n")
    cfg = parse(["--config", str(path), "--samples", "16", "temperature=0.2", "task_args.digits=3"])
    assert cfg.task == "math500" and cfg.samples == 16 and cfg.temperature == 0.2
    assert cfg.task_args == {"n": 5, "digits": 3}


def test_unknown_and_invalid_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("samples: 4\ntemprature: 0.6\n")
    with pytest.raises(ConfigError, match=f"^config \\({path} and overrides\\): temprature: unknown option; "
                       "did you mean temperature\\?$"):
        parse(["--config", str(path)])
    with pytest.raises(ConfigError, match="top_p: Input should be less than or equal to 1"):
        parse(["top_p=2"])
    with pytest.raises(ConfigError, match="override 'oops' is not key=value"):
        parse_overrides(["oops"])
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="a config is a mapping"):
        parse(["--config", str(path)])


def test_every_example_config_validates():
    from pathlib import Path

    from r1kit.config import PipelineConfig, TrainConfig, load_config
    from r1kit.pipeline.stages import resolve_stages
    from r1kit.rewards import REWARDS

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        kind = {"train": TrainConfig, "r1": PipelineConfig}.get(path.name.split("_")[0], EvalConfig)
        cfg = load_config(kind, path)
        trains = [s.config for s in resolve_stages(cfg) if s.kind == "train"] if kind is PipelineConfig else [cfg]
        for train in trains if kind is not EvalConfig else []:
            assert set(train.rewards) <= set(REWARDS), path


def test_override_values_that_are_not_yaml_stay_text():
    assert parse_overrides(["stages.sft.model=@cold_start", "n=3", "tags=[a, b]", "empty="]) == {
        "stages": {"sft": {"model": "@cold_start"}}, "n": 3, "tags": ["a", "b"], "empty": ""}


def test_unknown_keys_suggest_the_close_field_or_task_args():
    from r1kit.config import SampleConfig, TrainConfig, load_config

    with pytest.raises(ConfigError, match="^config \\(defaults and overrides\\): group_sise: unknown option; "
                       "did you mean group_size\\?$"):
        load_config(TrainConfig, None, parse_overrides(["group_sise=4"]))
    with pytest.raises(ConfigError, match="^config \\(defaults and overrides\\): filters.dedupe: unknown option; "
                       "did you mean filters.dedup\\?$"):
        load_config(SampleConfig, None, parse_overrides(["filters.dedupe=false"]))
    with pytest.raises(ConfigError, match="^config \\(defaults and overrides\\): zzz: unknown option$"):
        load_config(TrainConfig, None, {"zzz": 1})
    with pytest.raises(ConfigError, match="^config \\(defaults and overrides\\): prompt_field: unknown option; "
                       "task options go under task_args \\(task_args.prompt_field=question\\)$"):
        load_config(TrainConfig, None, parse_overrides(["task=jsonl", "prompt_field=question"]))
    with pytest.raises(ConfigError, match="digits: unknown option; task options go under task_args "
                       "\\(task_args.digits=3\\)$"):
        parse(["--task", "arithmetic", "digits=3"])


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("samples: 4\ntask_args: [a\nfoo: 1\n")
    with pytest.raises(ConfigError, match=f"^{path}:3:4: not valid YAML \\(while parsing a flow sequence: "
                       "expected ',' or '\\]', but got ':'\\)$"):
        parse(["--config", str(path)])
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'missing.yaml'}: cannot read config \\(\\[Errno 2\\]"):
        parse(["--config", str(tmp_path / "missing.yaml")])
