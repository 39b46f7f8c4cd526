"""torch.compile where it pays off, with a permanent eager fallback when it fails."""
from __future__ import annotations

import warnings
from typing import Callable

import torch


def compile_model(fn: Callable, device: str | torch.device, *, force: bool = False,
                  backend: str = "inductor") -> Callable:
    """`torch.compile(fn)` where it pays off, else `fn` itself.

    On CUDA the small models of a sweep are launch-bound and compiling fuses their kernels; on
    the CPU the compile time is not paid back at these sizes, so `fn` runs eagerly unless
    `force`. A compilation that fails (at torch.compile or at any later call, e.g. a recompile
    for a new batch size) warns once and falls back to eager for good; a genuine error in `fn`
    then re-raises from the eager call.
    """
    if torch.device(device).type != "cuda" and not force:
        return fn
    try:
        compiled = torch.compile(fn, backend=backend)
    except Exception as err:  # torch raises several types (invalid backend, no compiler)
        warnings.warn(f"torch.compile unavailable ({type(err).__name__}: {err}); running eagerly",
                      RuntimeWarning, stacklevel=2)
        return fn
    return _EagerFallback(compiled, fn)


class _EagerFallback:
    """Calls the compiled function until it first fails, then the eager one."""

    def __init__(self, compiled: Callable, eager: Callable):
        self.compiled, self.eager, self.failed = compiled, eager, False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:
                warnings.warn(f"torch.compile failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); running eagerly",
                              RuntimeWarning, stacklevel=2)
                self.failed = True
        return self.eager(*args, **kwargs)
