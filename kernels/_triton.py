"""What every Triton kernel here shares: interpreter detection, the bf16 upcast switch and the
fused-kernel dispatch rule.

Triton's CPU interpreter (`TRITON_INTERPRET=1`) stores bfloat16 values as their raw bits, so
a kernel that computes on a loaded bf16 tile gets silently wrong numbers. Every kernel takes a
`UPCAST: tl.constexpr` argument, converts each tile to float32 right after loading when it is
set, and receives `upcast()` for it: on only while interpreting, so compiled GPU code keeps
its native half-precision tiles (and tensor-core dots) and pays nothing.
"""

from __future__ import annotations

import torch
import triton

from denoised.kernels.backends import backends


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


def use_fused(*tensors: torch.Tensor) -> bool:
    """Whether a dispatcher takes its Triton kernel: `auto` does for CUDA tensors only."""
    backend = backends().fused
    if backend == "auto":
        return all(t.is_cuda for t in tensors)
    return backend == "triton"
