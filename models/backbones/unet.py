"""A UNet compatible with diffusers' `UNet2DModel` (the DDPM family of Ho et al., 2020).

Supported blocks are the ones released pixel-space checkpoints use: `DownBlock2D`,
`AttnDownBlock2D`, `UpBlock2D`, `AttnUpBlock2D` and the attention mid block, with the
positional (sinusoidal) time embedding and its `flip_sin_to_cos` / `freq_shift` options.
Parameter names match diffusers, so a `unet/` folder loads without renaming.

Optional class conditioning adds a learned class embedding to the time embedding. A model
trained with label dropout has one extra row, id `num_classes`, the null label for guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from denoised.models.backbones.architecture import Architecture
from denoised.models.backbones.conv_blocks import (
    Downsample,
    MidBlock,
    ResnetBlock,
    SpatialSelfAttention,
    Upsample,
)
from denoised.models.backbones.embeddings import TimestepMLP, timestep_embedding

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


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
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                "block_out_channels, down_block_types and up_block_types differ in length"
            )
        for kind in self.down_block_types:
            if kind not in DOWN_BLOCKS:
                raise ValueError(f"unsupported down block {kind!r}; supported: {DOWN_BLOCKS}")
        for kind in self.up_block_types:
            if kind not in UP_BLOCKS:
                raise ValueError(f"unsupported up block {kind!r}; supported: {UP_BLOCKS}")

    @property
    def class_rows(self) -> int:
        return 0 if self.num_classes is None else self.num_classes + int(self.null_label)


class DownBlock(nn.Module):
    """Resnets (each followed by self-attention when `attention`), then a stride-2 conv."""

    def __init__(
        self, c: UNetConfig, in_ch: int, out_ch: int, temb: int, attention: bool, down: bool
    ):
        super().__init__()
        g, eps = c.norm_num_groups, c.norm_eps
        head_dim = c.attention_head_dim or out_ch
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb, g, eps)
            for i in range(c.layers_per_block)
        )
        self.attentions = nn.ModuleList(
            SpatialSelfAttention(out_ch, head_dim, g, eps)
            for _ in range(c.layers_per_block if attention else 0)
        )
        self.downsamplers = nn.ModuleList(
            [Downsample(out_ch, c.downsample_padding)] if down else []
        )

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """Resnets over the input concatenated with the matching skip, optional attention, 2x up."""

    def __init__(
        self,
        c: UNetConfig,
        in_ch: int,
        prev_ch: int,
        out_ch: int,
        temb: int,
        attention: bool,
        up: bool,
    ):
        super().__init__()
        g, eps = c.norm_num_groups, c.norm_eps
        n = c.layers_per_block + 1
        head_dim = c.attention_head_dim or out_ch
        self.resnets = nn.ModuleList(
            ResnetBlock(
                (prev_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch),
                out_ch,
                temb,
                g,
                eps,
            )
            for i in range(n)
        )
        self.attentions = nn.ModuleList(
            SpatialSelfAttention(out_ch, head_dim, g, eps) for _ in range(n if attention else 0)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if up else [])

    def forward(
        self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x)
        for up in self.upsamplers:
            x = up(x)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        ch = c.block_out_channels
        temb = c.time_embedding_dim or 4 * ch[0]
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], temb)
        self.class_embedding = nn.Embedding(c.class_rows, temb) if c.class_rows else None
        last = len(ch) - 1
        self.down_blocks = nn.ModuleList(
            DownBlock(c, ch[max(i - 1, 0)], ch[i], temb, kind == "AttnDownBlock2D", i < last)
            for i, kind in enumerate(c.down_block_types)
        )
        self.mid_block = MidBlock(
            ch[-1],
            temb,
            c.norm_num_groups,
            c.norm_eps,
            head_dim=c.attention_head_dim or ch[-1],
            add_attention=c.add_attention,
            output_scale_factor=c.mid_block_scale_factor,
        )
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList(
            UpBlock(
                c,
                rev[min(i + 1, last)],
                rev[max(i - 1, 0)],
                rev[i],
                temb,
                kind == "AttnUpBlock2D",
                i < last,
            )
            for i, kind in enumerate(c.up_block_types)
        )
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    @property
    def null_label(self) -> int | None:
        c = self.config
        return c.num_classes if c.num_classes is not None and c.null_label else None

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x: [B, C, H, W]`, `t: [B]` (discrete-time models take values in [0, T)), `y: [B]`
        int64 labels for a class-conditional model (None: the null label)."""
        c = self.config
        if c.center_input_sample:
            x = 2 * x - 1.0
        freqs = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = self.time_embedding(freqs.to(self.conv_in.weight.dtype))
        if self.class_embedding is not None:
            if y is None:
                if self.null_label is None:
                    raise ValueError(
                        "this class-conditional model needs labels (it has no null label)"
                    )
                y = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            emb = emb + self.class_embedding(y)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb)
            skips.extend(block_skips)
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, skips, emb)
        return self.conv_out(F.silu(self.conv_norm_out(h)))
