"""torch.compile with a way back: a speed-up that fails to compile must not stop generation."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def compiled(fn: Callable, what: str) -> Callable:
    """`fn` compiled (dynamic shapes); if compiling raises, a warning and `fn` eagerly from then on."""
    current = [torch.compile(fn, dynamic=True)]

    def call(*args):
        try:
            return current[0](*args)
        except Exception as error:  # an inductor or triton failure on this machine's toolchain
            if current[0] is fn:
                raise
            warnings.warn(f"torch.compile failed for {what}, running it eagerly: {type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200]}", stacklevel=2)
            current[0] = fn
            return fn(*args)

    return call
