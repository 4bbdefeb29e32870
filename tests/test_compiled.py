import pytest

from r1kit.rollout import compiled as compiled_module


def test_a_function_that_fails_to_compile_runs_eagerly_with_a_warning(monkeypatch):
    def broken_compile(fn, dynamic):
        def fail(*args):
            raise RuntimeError("Scalar 2654435769 is out of range for type int32\nmore")
        return fail

    monkeypatch.setattr(compiled_module.torch, "compile", broken_compile)
    double = compiled_module.compiled(lambda x: 2 * x, "doubling")
    with pytest.warns(UserWarning, match="torch.compile failed for doubling, running it eagerly: RuntimeError: "
                                         "Scalar 2654435769 is out of range for type int32$"):
        assert double(3) == 6
    assert double(4) == 8
