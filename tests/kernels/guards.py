"""Output buffers for kernel tests: poisoned with NaN and fenced by NaN guard regions.

A kernel that skips an element leaves NaN in it; one that writes out of bounds overwrites a
guard. Both fail `check_guarded`.
"""

from __future__ import annotations

import torch

GUARD = 4096  # elements of NaN on each side of the output

# Tolerances (atol, rtol) of a kernel's output against a float64 reference on the same inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2.5e-2, 2e-2),
}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def guarded_empty(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, out): a NaN-filled buffer and the contiguous `shape` view inside its guards."""
    numel = 1
    for size in shape:
        numel *= size
    buffer = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype, device=DEVICE)
    return buffer, buffer[GUARD : GUARD + numel].view(shape)


def check_guarded(buffer: torch.Tensor, out: torch.Tensor) -> None:
    """The guards are still NaN and the output has no NaN left."""
    assert torch.isnan(buffer[:GUARD]).all() and torch.isnan(buffer[-GUARD:]).all(), (
        "kernel wrote outside its output"
    )
    assert not torch.isnan(out).any(), "kernel left output elements unwritten (or produced NaN)"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)
