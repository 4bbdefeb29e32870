import warnings

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError, InvalidCxxCompiler

from r1kit.rollout import compiled as compiled_module

TRITON_FAILURE = "Scalar 2654435769 is out of range for type int32"  # what a triton codegen bug once raised


def failing_backend(gm, example_inputs):
    """A compiler backend that fails as inductor does on a broken toolchain (dynamo wraps it)."""
    raise ValueError(TRITON_FAILURE + "\nmore")


def test_a_function_that_fails_to_compile_runs_eagerly_with_a_warning(monkeypatch):
    real_compile = torch.compile
    monkeypatch.setattr(compiled_module.torch, "compile",
                        lambda fn, dynamic: real_compile(fn, dynamic=dynamic, backend=failing_backend))
    calls = []

    def double(x):
        calls.append(1)
        return 2 * x

    run = compiled_module.compiled(double, "doubling")
    with pytest.warns(UserWarning, match=f"torch.compile failed for doubling, running it eagerly: ValueError: "
                                         f"{TRITON_FAILURE}$"):
        assert run(torch.tensor(3)).item() == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from then on, without another warning
        assert run(torch.tensor(4)).item() == 8
    assert len(calls) == 2  # the failed compile traced fn without running it: only the eager calls ran


class FakeCompiled:
    """What torch.compile returns, raising `error` at its first call and returning 2x after."""

    def __init__(self, error: BaseException):
        self.error, self.calls = error, 0

    def __call__(self, x):
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return 2 * x


@pytest.mark.parametrize("error", [RuntimeError("a bug in the function"),
                                   torch.OutOfMemoryError("CUDA out of memory"),
                                   InductorError(torch.OutOfMemoryError("out of memory while autotuning"), None)],
                         ids=["bug", "oom", "oom-while-compiling"])
def test_errors_of_a_compiled_call_propagate_and_it_stays_compiled(monkeypatch, error):
    fake = FakeCompiled(error)
    monkeypatch.setattr(compiled_module.torch, "compile", lambda fn, dynamic: fake)
    run = compiled_module.compiled(lambda x: 3 * x, "doubling")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        with pytest.raises(type(error)):
            run(1)
        assert run(4) == 8  # still the compiled function, not the eager one (3x)
    assert fake.calls == 2


def test_toolchain_failures_are_compile_failures():
    assert compiled_module.is_compile_failure(InductorError(InvalidCxxCompiler(), None))
    assert compiled_module.is_compile_failure(BackendCompilerFailed(failing_backend, ValueError("x"), None))
    assert not compiled_module.is_compile_failure(RuntimeError("CUDA error: an illegal memory access"))
    assert not compiled_module.is_compile_failure(torch.OutOfMemoryError("CUDA out of memory"))
