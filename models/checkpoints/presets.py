"""Released model shapes with seeded random weights, for benchmarks and compatibility checks.

No download: `build_preset` makes the backbone of a well-known checkpoint (same architecture,
same process definition) with weights drawn from a seeded generator, and
`materialize_preset` writes it, with its VAE decoder where it has one, as a model directory.

    dit-xl-2-256 / dit-b-2-256 / dit-s-2-256   DiT-{XL,B,S}/2 on 32x32x4 latents, SD VAE
    unet-ddpm-cifar10-32                       the DDPM CIFAR-10 UNet (35.7M parameters)
    sd3-medium-depth2                          SD3-medium's MMDiT cut to 2 of its 24 blocks
                                               (159M parameters), no VAE

The full SD3-medium transformer (`SD3_MEDIUM`, 2.03B parameters, 8 GB in float32) is no
preset: too large to build in memory for a benchmark; the depth-2 cut has its widths, text
dimensions and position table, so a forward's per-block cost is the real one.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from denoised.models.backbones.dit import DiT, dit_config
from denoised.models.backbones.mmdit import MMDiT, MMDiTConfig
from denoised.models.backbones.unet import UNet, UNetConfig
from denoised.models.backbones.vae import VAEConfig, VAEDecoder
from denoised.models.checkpoints.model_dir import save_model_dir

# The linear-beta DDPM schedule (Ho et al., 2020) that DiT and the DDPM UNets were trained with.
DDPM_LINEAR_PROCESS = {
    "type": "vp",
    "schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "prediction": "epsilon",
}
# SiT's default: linear interpolant with velocity prediction, t = 0 noise (Ma et al., 2024).
SIT_PROCESS = {
    "type": "flow",
    "shift": 1.0,
    "convention": "sit",
    "num_train_timesteps": 1000,
    "prediction": "velocity",
}
# The original DiT sampling code guides the first three of the four latent channels.
ORIGINAL_DIT_GUIDED_CHANNELS = 3
# stabilityai/stable-diffusion-3-medium-diffusers: transformer/config.json (1024 px through a
# 16-channel 8x VAE) and its scheduler's flow process, shift 3 (Esser et al., 2024).
SD3_MEDIUM = MMDiTConfig(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
SD3_PROCESS = {
    "type": "flow",
    "shift": 3.0,
    "convention": "rf",
    "num_train_timesteps": 1000,
    "prediction": "velocity",
}

_DIT_PRESETS = {"dit-xl-2-256": "DiT-XL/2", "dit-b-2-256": "DiT-B/2", "dit-s-2-256": "DiT-S/2"}
PRESET_NAMES = (*_DIT_PRESETS, "unet-ddpm-cifar10-32", "sd3-medium-depth2")


def _seeded(seed: int, make):
    """Run `make()` with the global RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def build_preset(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """`(backbone, config)` of a preset, ready for `save_model_dir(path, backbone, config, vae)`.

    The config's `vae` entry holds the decoder's architecture for `build_preset_vae`.
    """
    if name in _DIT_PRESETS:
        arch = dit_config(_DIT_PRESETS[name], input_size=32)
        config = {
            "name": name,
            "family": "dit",
            "process": dict(DDPM_LINEAR_PROCESS),
            "guided_channels": ORIGINAL_DIT_GUIDED_CHANNELS,
            "vae": VAEConfig().to_dict(),
            "source": f"preset {name} (random weights, seed {seed})",
        }
        return _seeded(seed, lambda: DiT(arch)), config
    if name == "unet-ddpm-cifar10-32":
        config = {
            "name": name,
            "family": "unet",
            "process": dict(DDPM_LINEAR_PROCESS),
            "vae": None,
            "source": f"preset {name} (random weights, seed {seed})",
        }
        return _seeded(seed, lambda: UNet(UNetConfig())), config
    if name == "sd3-medium-depth2":
        config = {
            "name": name,
            "family": "mmdit",
            "process": dict(SD3_PROCESS),
            "vae": None,
            "source": f"preset {name} (SD3-medium with 2 of 24 blocks, random weights, "
            f"seed {seed})",
        }
        return _seeded(seed, lambda: MMDiT(replace(SD3_MEDIUM, num_layers=2))), config
    raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESET_NAMES)}")


def build_preset_vae(config: dict, seed: int = 0) -> VAEDecoder | None:
    """The seeded random VAE decoder a preset config names (None for pixel-space presets)."""
    if config.get("vae") is None:
        return None
    return _seeded(seed + 1, lambda: VAEDecoder(VAEConfig.from_dict(config["vae"])))


def materialize_preset(name: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write preset `name` with seeded random weights as a model directory at `path`."""
    backbone, config = build_preset(name, seed)
    return save_model_dir(path, backbone, config, vae=build_preset_vae(config, seed))
