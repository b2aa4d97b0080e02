"""What every Triton kernel here shares: interpreter detection and the bf16 upcast switch.

Triton's CPU interpreter (`TRITON_INTERPRET=1`) stores bfloat16 values as their raw bits, so
a kernel that computes on a loaded bf16 tile gets silently wrong numbers. Every kernel takes a
`UPCAST: tl.constexpr` argument, converts each tile to float32 right after loading when it is
set, and receives `upcast()` for it: on only while interpreting, so compiled GPU code keeps
its native half-precision tiles (and tensor-core dots) and pays nothing.
"""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return bool(triton.knobs.runtime.interpret)


def upcast() -> bool:
    """Value for every kernel's `UPCAST` constexpr."""
    return interpreting()


def check_triton_device(*tensors: torch.Tensor) -> None:
    """ValueError unless the tensors can run a Triton kernel: CUDA, or any when interpreting."""
    if interpreting():
        return
    for t in tensors:
        if not t.is_cuda:
            raise ValueError(
                f"Triton kernels need CUDA tensors (got a tensor on {t.device}); run on a GPU "
                "or set TRITON_INTERPRET=1 to use Triton's CPU interpreter"
            )


FUSED_BACKENDS = ("auto", "triton", "reference")


def fused_backend() -> str:
    """The `DENOISED_FUSED` setting (auto|triton|reference) for the fused elementwise kernels
    (adaLN pieces, guidance + solver step); ValueError on anything else."""
    value = os.environ.get("DENOISED_FUSED", "auto").strip().lower()
    if value not in FUSED_BACKENDS:
        raise ValueError(f"DENOISED_FUSED must be one of {'|'.join(FUSED_BACKENDS)}, got {value!r}")
    return value


def use_fused(*tensors: torch.Tensor) -> bool:
    """Whether a dispatcher takes its Triton kernel: `auto` does for CUDA tensors only."""
    backend = fused_backend()
    if backend == "auto":
        return all(t.is_cuda for t in tensors)
    return backend == "triton"
