"""A small random DiT gives the same output on the kernels' path as on the eager path."""

from __future__ import annotations

import pytest
import torch
from guards import DEVICE

from denoised.kernels.backends import using_backends
from denoised.models.backbones.dit import DiT, DiTConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_dit_forward_matches_eager() -> None:
    torch.manual_seed(0)
    # Head dim 72 as in DiT-XL; 16 tokens; a learned-sigma output.
    config = DiTConfig(input_size=8, hidden_size=144, depth=2, num_heads=2, num_classes=5)
    model = DiT(config).to(DEVICE).eval()
    for p in model.parameters():  # DiT zero-initialises its gates; make every path count
        p.data.normal_(0, 0.05)
    x = torch.randn(3, 4, 8, 8, device=DEVICE)
    t = torch.tensor([0.0, 250.5, 999.0], device=DEVICE)
    y = torch.tensor([5, 0, 3], device=DEVICE)
    outputs = {}
    for path, attention, fused in (("eager", "sdpa", "reference"), ("kernels", "triton", "triton")):
        with using_backends(attention, fused), torch.no_grad():
            outputs[path] = model(x, t, y)
    torch.testing.assert_close(outputs["kernels"], outputs["eager"], atol=1e-4, rtol=1e-4)
