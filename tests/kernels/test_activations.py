"""`gelu_tanh` against `F.gelu(approximate="tanh")` in float64, on random and extreme inputs."""

import pytest
import torch
import torch.nn.functional as F
from guards import DEVICE

from denoised.kernels.activations import gelu_tanh

TOLERANCES = {torch.float32: 1e-6, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_gelu_tanh_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 4
    x = torch.cat([x, torch.tensor([0.0, -30.0, 30.0, -1e3, 1e3, 1e-8, -1e-8])])
    x = x.to(DEVICE, dtype)
    expected = F.gelu(x.double(), approximate="tanh")
    # Relative to the value, with an absolute floor near zero.
    error = (gelu_tanh(x).double() - expected).abs() / expected.abs().clamp_min(1.0)
    assert error.max().item() < TOLERANCES[dtype]
    assert gelu_tanh(x).dtype == dtype
