"""Convolutional building blocks shared by the UNets and the VAE decoder (diffusers layout).

Parameter names match diffusers' `ResnetBlock2D`, `Attention` (group-norm, residual form),
`Downsample2D`, `Upsample2D` and the UNet down/mid/up blocks, so their checkpoints load
without renaming. The blocks take the attention layer they hold as a factory, so the class-
and text-conditioned UNets share them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from denoised.kernels.attention import attention


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between (when given)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            assert temb is not None  # a block built with temb_channels is given temb
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class SpatialSelfAttention(nn.Module):
    """Self-attention over the H*W positions of a feature map, pre-GroupNorm, residual."""

    def __init__(
        self,
        channels: int,
        head_dim: int,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"{channels} channels are not divisible by the head width {head_dim}")
        self.num_heads = channels // head_dim
        self.output_scale_factor = output_scale_factor
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # [B, N, C]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, h * w, self.num_heads, c // self.num_heads).transpose(1, 2)

        out = attention(
            heads(self.to_q(tokens)), heads(self.to_k(tokens)), heads(self.to_v(tokens))
        )
        out = self.to_out[0](out.transpose(1, 2).reshape(b, h * w, c))
        return (out.transpose(1, 2).reshape(b, c, h, w) + x) / self.output_scale_factor


class Downsample(nn.Module):
    """Stride-2 3x3 conv; `padding=0` pads right/bottom by one first (the DDPM layout)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling (2x, or to `size`) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# Builds one attention layer of a block (its width is the block's); None: a block without.
AttentionFactory = Callable[[], nn.Module] | None


class DownBlock(nn.Module):
    """Resnets, each followed by an attention layer when `attention` builds them, then a
    stride-2 conv unless `downsample_padding` is None (diffusers' `DownBlock2D`,
    `AttnDownBlock2D`, `CrossAttnDownBlock2D`). Returns the output and the skips it leaves."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        temb: int,
        layers: int,
        groups: int,
        eps: float,
        downsample_padding: int | None,
        attention: AttentionFactory = None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb, groups, eps)
            for i in range(layers)
        )
        self.attentions = nn.ModuleList(
            [] if attention is None else [attention() for _ in range(layers)]
        )
        self.downsamplers = nn.ModuleList(
            [] if downsample_padding is None else [Downsample(out_ch, downsample_padding)]
        )

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, *context
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`context`: the attention layers' further inputs (the text, for cross-attention)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, *context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """Resnets over the input concatenated with the matching skip, each followed by an
    attention layer when `attention` builds them, then nearest-neighbour up to the next
    skip's size (diffusers' `UpBlock2D`, `AttnUpBlock2D`, `CrossAttnUpBlock2D`)."""

    def __init__(
        self,
        in_ch: int,
        prev_ch: int,
        out_ch: int,
        temb: int,
        layers: int,
        groups: int,
        eps: float,
        upsample: bool,
        attention: AttentionFactory = None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(
                (prev_ch if i == 0 else out_ch) + (in_ch if i == layers - 1 else out_ch),
                out_ch,
                temb,
                groups,
                eps,
            )
            for i in range(layers)
        )
        self.attentions = nn.ModuleList(
            [] if attention is None else [attention() for _ in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(
        self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, *context
    ) -> torch.Tensor:
        """Pops this block's skips off `skips`; `context` as in `DownBlock.forward`."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, *context)
        for up in self.upsamplers:
            # The next skip's size, not 2x: an odd side halved on the way down comes back.
            x = up(x, skips[-1].shape[-2:])
        return x


class MidBlock(nn.Module):
    """Resnet, attention, resnet at the lowest resolution (diffusers' `UNetMidBlock2D`, and
    `UNetMidBlock2DCrossAttn` with a cross-attention layer); `attention` None: no attention."""

    def __init__(
        self,
        channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        attention: nn.Module | None,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(channels, channels, temb_channels, groups, eps, output_scale_factor)
            for _ in range(2)
        )
        self.attentions = nn.ModuleList([] if attention is None else [attention])

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, *context) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for attn in self.attentions:
            x = attn(x, *context)
        return self.resnets[1](x, temb)
