"""Which implementation the kernel dispatchers take, one choice per process.

`attention` (auto|triton|sdpa) picks the attention backend, `fused` (auto|triton|reference)
the fused elementwise kernels (adaLN pieces, guidance + solver step). `auto` runs the Triton
kernels on CUDA tensors and the PyTorch references elsewhere. The server sets both from its
settings (`--attention`, `--fused`, `DENOISED_ATTENTION`, `DENOISED_FUSED`) before any model
loads; tests and benchmarks use `using_backends`. Importing this module costs nothing: the
settings validate against it without importing Triton.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

ATTENTION_BACKENDS = ("auto", "triton", "sdpa")
FUSED_BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class Backends:
    attention: str = "auto"
    fused: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("attention", ATTENTION_BACKENDS), ("fused", FUSED_BACKENDS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"{name} backend (--{name}, DENOISED_{name.upper()}) must be one of "
                    f"{'|'.join(allowed)}, got {value!r}"
                )


_current = Backends()


def backends() -> Backends:
    """The backends in force."""
    return _current


def set_backends(attention: str | None = None, fused: str | None = None) -> Backends:
    """Choose the backends (None keeps one as it is); ValueError naming a bad value. Returns
    the previous choice."""
    global _current
    previous = _current
    changes = {k: v for k, v in (("attention", attention), ("fused", fused)) if v is not None}
    _current = replace(_current, **changes)
    return previous


@contextmanager
def using_backends(attention: str | None = None, fused: str | None = None) -> Iterator[None]:
    """`set_backends` for the duration of a block."""
    previous = set_backends(attention, fused)
    try:
        yield
    finally:
        set_backends(previous.attention, previous.fused)
