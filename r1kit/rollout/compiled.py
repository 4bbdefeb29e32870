"""torch.compile with a way back: a speed-up that fails to compile must not stop generation."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch


@functools.cache
def compile_failures() -> tuple[type[BaseException], ...]:
    """What compiling raises, never running: inductor, triton or the C++ compiler failing (BackendCompilerFailed,
    which InductorError is), no usable triton, dynamo unable to trace.

    They are raised before the compiled graph runs (triton's at worst before one of its kernels first launches,
    and the functions compiled here write the same outputs again from the same inputs). Runtime errors (out of
    memory, a bug in fn, a failed launch) are not among them, and neither is TorchRuntimeError: tracing fn with
    fake tensors failed, as running it eagerly would. Imported when first needed: torch._dynamo takes a second."""
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, Unsupported
    from torch._inductor.exc import GPUTooOldForTriton, TritonMissing

    return (BackendCompilerFailed, TritonMissing, GPUTooOldForTriton, Unsupported, InternalTorchDynamoError,
            *_triton_errors())


def _triton_errors() -> tuple[type[BaseException], ...]:
    """Triton's own compile failures, which surface unwrapped when inductor compiles a kernel at its first launch."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import PTXASError
    except ImportError:  # a CPU-only install has no triton
        return ()
    return CompilationError, PTXASError


def is_compile_failure(error: BaseException) -> bool:
    """Whether error says that compiling failed (and not that memory ran out while compiling)."""
    inner = getattr(error, "inner_exception", None)
    if isinstance(error, torch.OutOfMemoryError) or isinstance(inner, torch.OutOfMemoryError):
        return False  # short of memory now, not a toolchain that cannot compile: eager would not fix it for good
    return isinstance(error, compile_failures())


def compiled(fn: Callable, what: str) -> Callable:
    """`fn` compiled (dynamic shapes); if compiling fails, a warning and `fn` eagerly from then on.

    Compiling is lazy (at the first call, and again at each new shape torch specializes on), so the fallback
    is at the call too; every other error of the call propagates, and `fn` stays compiled."""
    current = [torch.compile(fn, dynamic=True)]

    def call(*args):
        if current[0] is fn:
            return fn(*args)
        try:
            return current[0](*args)
        except Exception as error:
            if not is_compile_failure(error):
                raise
            warnings.warn(f"torch.compile failed for {what}, running it eagerly: {_describe(error)}", stacklevel=2)
            current[0] = fn
            return fn(*args)

    return call


def _describe(error: BaseException) -> str:
    """The failure's type and first line, naming the compiler's own error rather than its wrapper."""
    cause = getattr(error, "inner_exception", None) or error
    lines = str(cause).splitlines()
    return f"{type(cause).__name__}: {lines[0][:200] if lines else ''}"
