"""DiT: the diffusion transformer of Peebles & Xie (2023), also the SiT backbone (Ma et al., 2024).

Latents are cut into p x p patches, embedded, given a fixed 2-D sin-cos position table, and
run through `depth` adaLN-Zero blocks conditioned on the sum of a timestep embedding and a
class embedding. The class table has one extra row, id `num_classes`, the null label that
classifier-free guidance feeds for the unconditional branch. With learned sigma the output
has twice the input channels (noise prediction, then the variance interpolation); the
server uses the first half.

Parameter names follow the original DiT release, so its checkpoints load as they are;
`models/checkpoints/convert.py` maps diffusers' `DiTTransformer2DModel` onto these names. Two
settings tell the lineages apart: the timestep-frequency shift (original 0, diffusers 1) and the
eps of the LayerNorm before the MLP (original 1e-6, diffusers 1e-5).

Every timestep and label is per sample, so one batch can mix requests at different steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn

from denoised.kernels.activations import gelu_tanh

# The elementwise steps around every branch of a block: fused Triton kernels on CUDA, the
# PyTorch reference elsewhere (kernels/adaln.py).
from denoised.kernels.adaln import (
    gate_residual,
    gate_residual_layer_norm_modulate,
    layer_norm_modulate,
)
from denoised.kernels.attention import attention
from denoised.models.backbones.architecture import Architecture
from denoised.models.backbones.embeddings import sincos_2d, timestep_embedding

# Width of the sinusoidal timestep features fed to the timestep MLP.
TIME_FREQ_DIM = 256
# eps of the LayerNorms before attention and before the output layer (both lineages).
ADALN_NORM_EPS = 1e-6


@dataclass(frozen=True)
class DiTConfig(Architecture):
    input_size: int = 32  # latent side (256 px images through an 8x VAE)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


# (depth, hidden size, heads) of the paper's model sizes.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def dit_config(name: str, **overrides) -> DiTConfig:
    """A named configuration such as "DiT-XL/2" (sizes S/B/L/XL, patch 2/4/8), with overrides."""
    size, _, patch = name.removeprefix("DiT-").removeprefix("SiT-").partition("/")
    if size not in DIT_SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown DiT configuration {name!r}; expected DiT-{{S,B,L,XL}}/{{2,4,8}}")
    depth, hidden, heads = DIT_SIZES[size]
    base = DiTConfig(patch_size=int(patch), hidden_size=hidden, depth=depth, num_heads=heads)
    return replace(base, **overrides)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens `[B, (H/p)*(W/p), D]`, row-major."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def patch_grid(x: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """The token grid `(H/p, W/p)` of latents `x: [B, C, H, W]`; ValueError unless p divides
    both sides."""
    h, w = x.shape[-2:]
    if h % patch_size or w % patch_size:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {patch_size}")
    return h // patch_size, w // patch_size


def unpatchify(
    tokens: torch.Tensor, grid_h: int, grid_w: int, patch_size: int, channels: int
) -> torch.Tensor:
    """`[B, N, p*p*C] -> [B, C, H, W]` (patch pixels row-major, channels last)."""
    p, c = patch_size, channels
    x = tokens.reshape(-1, grid_h, grid_w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, c, grid_h * p, grid_w * p)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, freq_shift: float):
        super().__init__()
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(
            t, TIME_FREQ_DIM, flip_sin_to_cos=True, freq_shift=self.freq_shift
        )
        # nn.Sequential items are typed as plain modules.
        return self.mlp(freqs.to(cast(nn.Linear, self.mlp[0]).weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with the null label as its last row (id `num_classes`)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D/H]
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class DiTBlock(nn.Module):
    """Attention and MLP branches, each normalised, modulated and gated by the conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float):
        super().__init__()
        self.mlp_norm_eps = mlp_norm_eps
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        branch = self.attn(layer_norm_modulate(x, shift_msa, scale_msa, ADALN_NORM_EPS))
        x, h = gate_residual_layer_norm_modulate(
            x, gate_msa, branch, shift_mlp, scale_mlp, self.mlp_norm_eps
        )
        return gate_residual(x, gate_mlp, self.mlp(h))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(layer_norm_modulate(x, shift, scale, ADALN_NORM_EPS))


class DiT(nn.Module):
    pos_embed: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.x_embedder = PatchEmbed(c.in_channels, c.hidden_size, c.patch_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size, c.freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.mlp_norm_eps)
            for _ in range(c.depth)
        )
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.grid = c.input_size // c.patch_size
        self.register_buffer(
            "pos_embed", sincos_2d(c.hidden_size, self.grid, self.grid), persistent=False
        )

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        if grid_h == grid_w == self.grid:
            return self.pos_embed
        return sincos_2d(self.config.hidden_size, grid_h, grid_w).to(self.pos_embed)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x: [B, C, H, W]`, `t: [B]` in the model's time convention, `y: [B]` int64 labels
        (None: the null label for every sample). Returns `[B, out_channels, H, W]`."""
        grid_h, grid_w = patch_grid(x, self.config.patch_size)
        if y is None:
            y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        tokens = self.x_embedder(x)
        tokens = tokens + self.position_table(grid_h, grid_w)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c), grid_h, grid_w)

    def unpatchify(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        return unpatchify(tokens, grid_h, grid_w, self.config.patch_size, self.config.out_channels)

    @torch.no_grad()
    def initialize_for_training(self) -> None:
        """The paper's initialisation: Xavier-uniform linears, zeroed adaLN and output layers
        (every block starts as the identity), N(0, 0.02) label and timestep embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.x_embedder.proj
        assert proj.bias is not None  # PatchEmbed's convolution has one
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # nn.Sequential and nn.ModuleList items are typed as plain modules.
        mlp = self.t_embedder.mlp
        nn.init.normal_(cast(nn.Linear, mlp[0]).weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, mlp[2]).weight, std=0.02)
        for block in cast("Iterable[DiTBlock]", self.blocks):
            modulation = cast(nn.Linear, block.adaLN_modulation[-1])
            nn.init.zeros_(modulation.weight)
            nn.init.zeros_(modulation.bias)
        final_modulation = cast(nn.Linear, self.final_layer.adaLN_modulation[-1])
        for layer in (final_modulation, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
