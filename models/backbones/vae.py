"""The decoder half of the KL autoencoder that latent diffusion models sample in.

Layout and parameter names follow diffusers' `AutoencoderKL` (`post_quant_conv` and
`decoder.*`), the layout of the sd-vae-ft-ema / sd-vae-ft-mse releases that DiT and Stable
Diffusion 1.x/2.x use (4 latent channels, scaling 0.18215; Rombach et al., 2022), and of
Stable Diffusion 3's (16 latent channels, no `post_quant_conv`, and a `shift_factor`: latents
decode as `z / scaling_factor + shift_factor`; Esser et al., 2024). Files
written by older diffusers versions name the mid-block attention `query/key/value/proj_attn`;
`legacy_vae_key` maps them onto the current names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from denoised.models.backbones.architecture import Architecture
from denoised.models.backbones.conv_blocks import (
    MidBlock,
    ResnetBlock,
    SpatialSelfAttention,
    Upsample,
)

# Latent scale of the Stable Diffusion VAE (Rombach et al., 2022): latents are divided by it
# before decoding.
SD_VAE_SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class VAEConfig(Architecture):
    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    scaling_factor: float = SD_VAE_SCALING_FACTOR
    shift_factor: float = 0.0
    use_post_quant_conv: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


class UpDecoderBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, None, groups, 1e-6)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        channels = list(reversed(c.block_out_channels))
        groups = c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(
            channels[0],
            None,
            groups,
            1e-6,
            SpatialSelfAttention(channels[0], channels[0], groups, 1e-6)
            if c.mid_block_add_attention
            else None,
        )
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(
                channels[max(i - 1, 0)],
                channels[i],
                c.layers_per_block + 1,
                groups,
                i < len(channels) - 1,
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None
        self.decoder = Decoder(config)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents `[B, C, h, w]` -> raw images `[B, 3, h*f, w*f]` (not clamped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the diffusion model samples them -> images clamped to [-1, 1]."""
        weight = self.decoder.conv_in.weight
        z = latents.to(device=weight.device, dtype=weight.dtype) / self.scaling_factor
        return self(z + self.config.shift_factor).clamp(-1, 1)


# Older diffusers names of the mid-block attention projections.
_LEGACY_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


def legacy_vae_key(key: str) -> str:
    """Rename `...attentions.0.query.weight` style keys to the current `to_q` names."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION_NAMES and "attentions" in parts:
        parts[-2] = _LEGACY_ATTENTION_NAMES[parts[-2]]
    return ".".join(parts)


def vae_decoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's share of a full `AutoencoderKL` state dict, with legacy names renamed and
    1x1-conv attention weights (some exports) reshaped to linear weights."""
    out = {}
    for key, value in state.items():
        if not key.startswith(("decoder.", "post_quant_conv.")):
            continue  # the encoder half is not used for sampling
        key = legacy_vae_key(key)
        if ".attentions." in key and value.ndim == 4 and value.shape[-2:] == (1, 1):
            value = value[:, :, 0, 0]
        out[key] = value
    return out
