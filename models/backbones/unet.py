"""A UNet compatible with diffusers' `UNet2DModel` (the DDPM family of Ho et al., 2020).

Supported blocks are the ones released pixel-space checkpoints use: `DownBlock2D`,
`AttnDownBlock2D`, `UpBlock2D`, `AttnUpBlock2D` and the attention mid block, with the
positional (sinusoidal) time embedding and its `flip_sin_to_cos` / `freq_shift` options.
Parameter names match diffusers, so a `unet/` folder loads without renaming.

Optional class conditioning adds a learned class embedding to the time embedding. A model
trained with label dropout has one extra row, id `num_classes`, the null label for guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from denoised.models.backbones.architecture import Architecture
from denoised.models.backbones.conv_blocks import (
    AttentionFactory,
    DownBlock,
    MidBlock,
    SpatialSelfAttention,
    UpBlock,
)
from denoised.models.backbones.embeddings import TimestepMLP, timestep_embedding

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
ATTENTION_BLOCKS = ("AttnDownBlock2D", "AttnUpBlock2D")


def check_blocks(c, down_blocks: tuple[str, ...], up_blocks: tuple[str, ...]) -> None:
    """ValueError unless config `c` has one down and one up block per level, of these kinds."""
    n = len(c.block_out_channels)
    if len(c.down_block_types) != n or len(c.up_block_types) != n:
        raise ValueError("block_out_channels, down_block_types and up_block_types differ in length")
    for kind in c.down_block_types:
        if kind not in down_blocks:
            raise ValueError(f"unsupported down block {kind!r}; supported: {down_blocks}")
    for kind in c.up_block_types:
        if kind not in up_blocks:
            raise ValueError(f"unsupported up block {kind!r}; supported: {up_blocks}")


@dataclass(frozen=True)
class UNetConfig(Architecture):
    """Defaults are the DDPM CIFAR-10 model (google/ddpm-cifar10-32)."""

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    down_block_types: tuple[str, ...] = (
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    attention_head_dim: int | None = None  # None: one head as wide as the block
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    downsample_padding: int = 0
    mid_block_scale_factor: float = 1.0
    add_attention: bool = True
    center_input_sample: bool = False
    time_embedding_dim: int | None = None  # None: 4 x block_out_channels[0]
    num_classes: int | None = None  # None: unconditional
    null_label: bool = True  # the class table has the guidance row (id num_classes)

    def __post_init__(self):
        check_blocks(self, DOWN_BLOCKS, UP_BLOCKS)

    @property
    def class_rows(self) -> int:
        return 0 if self.num_classes is None else self.num_classes + int(self.null_label)


class UNetLevels(nn.Module):
    """The layout both UNets share (diffusers' `UNet2DModel` and `UNet2DConditionModel`): the
    time-embedding MLP, conv_in, a down block per resolution level (a stride-2 conv on all but
    the last), the mid block, an up block per level (one resnet more, over the skips), then
    GroupNorm-SiLU-conv. `c` is a config with `UNetConfig`'s layout fields; `attention(level,
    kind)` gives the attention factory of the block of that kind at that level."""

    def __init__(
        self,
        c,
        attention: Callable[[int, str], AttentionFactory],
        mid_attention: nn.Module | None,
    ):
        super().__init__()
        self.config = c
        ch = c.block_out_channels
        g, eps, layers, last = c.norm_num_groups, c.norm_eps, c.layers_per_block, len(ch) - 1
        temb = c.time_embedding_dim or 4 * ch[0]
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], temb)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                ch[max(level - 1, 0)],
                ch[level],
                temb,
                layers,
                g,
                eps,
                c.downsample_padding if level < last else None,
                attention(level, kind),
            )
            for level, kind in enumerate(c.down_block_types)
        )
        self.mid_block = MidBlock(
            ch[-1], temb, g, eps, mid_attention, output_scale_factor=c.mid_block_scale_factor
        )
        self.up_blocks = nn.ModuleList(
            UpBlock(
                ch[max(level - 1, 0)],
                ch[min(level + 1, last)],
                ch[level],
                temb,
                layers + 1,
                g,
                eps,
                level > 0,
                attention(level, kind),
            )
            for level, kind in zip(range(last, -1, -1), c.up_block_types, strict=True)
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        freqs = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        return self.time_embedding(freqs.to(self.conv_in.weight.dtype))

    def levels(self, x: torch.Tensor, emb: torch.Tensor, *context) -> torch.Tensor:
        """Input to output given the embedding `emb`; `context` goes to the attention layers."""
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, *context)
            skips.extend(block_skips)
        h = self.mid_block(h, emb, *context)
        for block in self.up_blocks:
            h = block(h, skips, emb, *context)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class UNet(UNetLevels):
    def __init__(self, config: UNetConfig):
        c = config
        g, eps = c.norm_num_groups, c.norm_eps

        def self_attention(width: int) -> nn.Module:
            return SpatialSelfAttention(width, c.attention_head_dim or width, g, eps)

        def attention(level: int, kind: str) -> AttentionFactory:
            width = c.block_out_channels[level]
            return (lambda: self_attention(width)) if kind in ATTENTION_BLOCKS else None

        last = c.block_out_channels[-1]
        super().__init__(c, attention, self_attention(last) if c.add_attention else None)
        temb = self.time_embedding.linear_2.out_features
        self.class_embedding = nn.Embedding(c.class_rows, temb) if c.class_rows else None

    @property
    def null_label(self) -> int | None:
        c = self.config
        return c.num_classes if c.num_classes is not None and c.null_label else None

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x: [B, C, H, W]`, `t: [B]` (discrete-time models take values in [0, T)), `y: [B]`
        int64 labels for a class-conditional model (None: the null label)."""
        emb = self.embed_time(t)
        if self.class_embedding is not None:
            if y is None:
                if self.null_label is None:
                    raise ValueError(
                        "this class-conditional model needs labels (it has no null label)"
                    )
                y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            emb = emb + self.class_embedding(y)
        return self.levels(x, emb)
