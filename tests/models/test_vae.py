"""VAE decoder against diffusers' AutoencoderKL.decode (the SD 1.x/2.x and SD3 configurations),
scaling and shift, and legacy attention names."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers_reference import SD3_VAE, assert_close, random_vae

from denoised.models.backbones.vae import (
    VAEConfig,
    VAEDecoder,
    legacy_vae_key,
    vae_decoder_state_dict,
)
from denoised.models.checkpoints.convert import vae_config_from_diffusers


def load_ours(ref: AutoencoderKL, state=None) -> VAEDecoder:
    ours = VAEDecoder(vae_config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(vae_decoder_state_dict(state or ref.state_dict()), strict=True)
    return ours


def test_matches_diffusers_decode():
    ref = random_vae()
    ours = load_ours(ref)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = ref.decode(z).sample, ours(z)
    scale = theirs.abs().max().item()
    assert scale > 0.1 and mine.shape == (3, 3, 16, 16)
    assert (mine - theirs).abs().max().item() <= 1e-5 * scale


def test_decode_applies_scaling_factor_and_clamps():
    ref = random_vae()
    ours = load_ours(ref)
    assert ours.scaling_factor == 0.18215
    latents = torch.randn(2, 4, 8, 8) * 3
    with torch.no_grad():
        images = ours.decode(latents)
        expected = ref.decode(latents / 0.18215).sample.clamp(-1, 1)
    assert images.min() >= -1 and images.max() <= 1
    assert (images - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_sd3_vae_matches_diffusers_decode():
    ref = random_vae(**SD3_VAE)
    assert ref.post_quant_conv is None
    ours = load_ours(ref)
    assert ours.post_quant_conv is None
    assert (ours.config.shift_factor, ours.config.scaling_factor) == (0.0609, 1.5305)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        assert_close(ours(latents), ref.decode(latents).sample)
        # As diffusers' SD3 pipeline decodes: latents / scaling_factor + shift_factor.
        expected = ref.decode(latents / 1.5305 + 0.0609).sample.clamp(-1, 1)
        assert_close(ours.decode(latents), expected)
        assert (ours.decode(latents) - ours(latents / 1.5305).clamp(-1, 1)).abs().max() > 1e-4


def test_latent_normalisation_is_refused():
    config = {**random_vae().config, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    with pytest.raises(ValueError, match="AutoencoderKL latents_mean is not supported"):
        vae_config_from_diffusers(config)


def test_legacy_attention_names_are_renamed():
    ref = random_vae()
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert legacy_vae_key("decoder.mid_block.attentions.0.query.bias") == (
        "decoder.mid_block.attentions.0.to_q.bias"
    )
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_ours(ref, legacy)(z), load_ours(ref)(z))


def test_sd_vae_layout_matches_diffusers():
    """The default config is the sd-vae-ft-ema/mse decoder: same names and shapes (meta)."""
    sd_vae = {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 256,
    }
    with torch.device("meta"):
        ref = AutoencoderKL(**sd_vae)
        ours = VAEDecoder(VAEConfig())
    assert vae_config_from_diffusers(dict(ref.config)) == VAEConfig()
    theirs = {k: v.shape for k, v in vae_decoder_state_dict(ref.state_dict()).items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    assert VAEConfig().downscale == 8


def test_sd3_vae_layout_matches_diffusers():
    sd3_vae = {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        **SD3_VAE,
    }
    with torch.device("meta"):
        ref = AutoencoderKL(**sd3_vae)
        ours = VAEDecoder(vae_config_from_diffusers(dict(ref.config)))
    theirs = {k: v.shape for k, v in vae_decoder_state_dict(ref.state_dict()).items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    assert not any(k.startswith("post_quant_conv") for k in theirs)
