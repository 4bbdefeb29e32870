"""The optional vLLM backend against a stand-in `vllm` module (vLLM itself needs a GPU and is not a dependency)."""

import sys
from types import SimpleNamespace

import pytest

from r1kit.config import ConfigError
from r1kit.rollout import SamplingParams, make_generator
from r1kit.rollout.vllm import VLLMGenerator


class FakeLLM:
    """Records what it was given; answers each prompt with n outputs of two tokens."""

    def __init__(self, **options):
        self.options, self.calls = options, []

    def generate(self, prompts, sampling, use_tqdm):
        self.calls.append((prompts, sampling))
        lp = SimpleNamespace

        def output(i: int, j: int) -> SimpleNamespace:
            return SimpleNamespace(text=f"out {i}.{j}", token_ids=[7, 2], finish_reason="stop" if j == 0 else "length",
                                   logprobs=[{7: lp(logprob=-0.5), 9: lp(logprob=-1.5)}, {2: lp(logprob=-0.25)}])

        return [SimpleNamespace(outputs=[output(i, j) for j in range(sampling.n)]) for i in range(len(prompts))]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_completions_map_to_r1kit_ones(fake_vllm, tokenizer):
    gen = VLLMGenerator("/models/x", tokenizer)
    assert gen.llm.options["model"] == "/models/x" and gen.llm.options["dtype"] == "bfloat16"
    params = SamplingParams(n=2, temperature=0.6, top_p=0.95, max_tokens=5, stop=("###",), seed=3, top_logprobs=2)
    done = []
    out = gen.generate(["a", "b"], params, progress=done.append)
    (prompts, sampling), = gen.llm.calls
    assert prompts == [{"prompt_token_ids": gen.encode("a")}, {"prompt_token_ids": gen.encode("b")}]
    assert (sampling.n, sampling.temperature, sampling.top_k, sampling.stop, sampling.seed, sampling.logprobs) == (
        2, 0.6, -1, ["###"], 3, 2)
    assert [c.prompt_index for c in out] == [0, 0, 1, 1] and done == [4]
    assert out[0].token_ids == [7, 2] and out[0].logprobs == [-0.5, -0.25] and out[0].text == "out 0.0"
    assert [c.finish_reason for c in out[:2]] == ["stop", "length"]
    assert out[0].top_logprobs == [{7: -0.5, 9: -1.5}, {2: -0.25}]
    assert gen.generate(["a"], SamplingParams())[0].top_logprobs is None


def test_vllm_backend_by_name_and_its_absence(fake_vllm, tokenizer, monkeypatch):
    model = SimpleNamespace(name_or_path="/models/y")
    assert make_generator(model, tokenizer, "vllm").llm.options["model"] == "/models/y"
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    with pytest.raises(ConfigError, match=r"backend vllm needs vLLM installed \(pip install vllm\)"):
        make_generator(model, tokenizer, "vllm")


def test_training_does_not_take_the_vllm_backend():
    from pydantic import ValidationError

    from r1kit.config import EvalConfig, TrainConfig

    assert EvalConfig(backend="vllm").backend == "vllm"
    with pytest.raises(ValidationError, match="backend"):
        TrainConfig(backend="vllm")
