"""The one attention entry point used by every attention layer (DiT, UNet, VAE).

`attention(q, k, v)` takes `[batch, heads, tokens, head_dim]` tensors and returns the
non-causal softmax attention with scale `1/sqrt(head_dim)`. The backend is chosen per call:
PyTorch's scaled_dot_product_attention everywhere for now; the Triton flash-attention
kernel plugs in here for CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)
