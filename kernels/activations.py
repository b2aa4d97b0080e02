"""Activations whose fastest form depends on the device.

`gelu_tanh` is GELU with the tanh approximation (Hendrycks & Gimpel, 2016), as DiT and SD3
use it. 0.5·(1 + tanh(z)) = σ(2z), so it is also x·σ(2·√(2/π)·(x + 0.044715·x³)): the same
function, which on CPU compiles (inductor) to code 3× faster than `F.gelu`'s tanh form and
runs 1.4× faster eager in float32 (1024×512, one thread; bf16 eager on par). On CUDA the
one-kernel `F.gelu` stays.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_TWO_SQRT_2_OVER_PI = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: `F.gelu(x, approximate="tanh")` within rounding."""
    if x.is_cuda:
        return F.gelu(x, approximate="tanh")
    return x * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
