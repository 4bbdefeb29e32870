"""`vllm` is no backend: a config, a flag or make_generator asking for it fails with the valid choices."""

from __future__ import annotations

import pytest

from r1kit.cli import build_parser
from r1kit.config import ConfigError, EvalConfig, TrainConfig, load_config


@pytest.mark.parametrize("cls", [EvalConfig, TrainConfig])
def test_a_config_asking_for_vllm_lists_the_backends(cls):
    with pytest.raises(ConfigError, match="backend: Input should be 'auto', 'hf' or 'engine'"):
        load_config(cls, None, {"backend": "vllm"})


def test_the_backend_flag_lists_its_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["eval", "--backend", "vllm"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --backend: invalid choice: 'vllm' (choose from" in err and "engine" in err


def test_make_generator_refuses_vllm():
    import torch

    from r1kit.rollout import make_generator

    with pytest.raises(ValueError, match="unknown backend 'vllm'; choose one of auto, hf, engine"):
        make_generator(torch.nn.Linear(1, 1), None, "vllm")
