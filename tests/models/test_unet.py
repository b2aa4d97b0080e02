"""UNet against diffusers' UNet2DModel (DDPM CIFAR-10 layout, and a class-conditional one)."""

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from denoised.models.backbones.unet import UNet, UNetConfig
from denoised.models.checkpoints.convert import (
    convert_diffusers_pipeline,
    unet_config_from_diffusers,
)
from denoised.models.checkpoints.model_dir import load_model_dir

# google/ddpm-cifar10-32 with its widths divided by 4 and 16x16 inputs.
CIFAR10_REDUCED = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 64, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": None,
    "norm_num_groups": 8,
    "norm_eps": 1e-6,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
}
# Class-conditional, the other time-embedding options, multi-head attention in every place.
CONDITIONAL = {
    **CIFAR10_REDUCED,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": 16,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "num_class_embeds": 6,  # 5 classes + the null label
}


def random_unet(config: dict) -> UNet2DModel:
    torch.manual_seed(0)
    ref = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    return ref


@pytest.mark.parametrize("config", [CIFAR10_REDUCED, CONDITIONAL], ids=["cifar10", "conditional"])
def test_matches_diffusers_through_pipeline_converter(tmp_path, config):
    ref = random_unet(config)
    DDPMPipeline(unet=ref, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    convert_diffusers_pipeline(tmp_path / "pipe", tmp_path / "model")
    loaded = load_model_dir(tmp_path / "model")
    assert loaded.config["family"] == "unet"
    assert loaded.process.to_config()["prediction"] == "epsilon"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0.0, 417.0, 999.0])  # a different step per sample
    y = torch.tensor([5, 0, 3]) if "num_class_embeds" in config else None
    with torch.no_grad():
        ours, theirs = loaded.backbone(x, t, y), ref(x, t, y).sample
    scale = theirs.abs().max().item()
    assert scale > 0.1
    assert (ours - theirs).abs().max().item() <= 1e-5 * scale
    if y is not None:
        assert loaded.num_classes == 5 and loaded.guided_channels == 3


def test_full_cifar10_layout_matches_diffusers():
    """The preset-size DDPM CIFAR-10 UNet has diffusers' names and shapes (meta device)."""
    with torch.device("meta"):
        ref = UNet2DModel(
            **{
                **CIFAR10_REDUCED,
                "block_out_channels": (128, 256, 256, 256),
                "norm_num_groups": 32,
                "sample_size": 32,
            }
        )
        ours = UNet(UNetConfig())
        assert unet_config_from_diffusers(dict(ref.config)) == UNetConfig()
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 35_746_307  # google/ddpm-cifar10-32


def test_conditional_unet_without_labels_uses_null_label():
    torch.manual_seed(0)
    model = UNet(UNetConfig.from_dict(_our_config(CONDITIONAL))).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 5.0])
    with torch.no_grad():
        assert torch.equal(model(x, t, None), model(x, t, torch.tensor([5, 5])))


def _our_config(config: dict) -> dict:
    out = {k: v for k, v in config.items() if k != "num_class_embeds"}
    return {**out, "num_classes": config["num_class_embeds"] - 1}


def test_config_errors():
    with pytest.raises(ValueError, match="unsupported down block 'CrossAttnDownBlock2D'"):
        UNetConfig(down_block_types=("CrossAttnDownBlock2D",) * 4)
    with pytest.raises(ValueError, match="time_embedding_type='fourier'"):
        unet_config_from_diffusers({**CIFAR10_REDUCED, "time_embedding_type": "fourier"})
