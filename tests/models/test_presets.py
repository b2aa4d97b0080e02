"""Random-weight presets: the released shapes, seeded, and loadable as model directories."""

from dataclasses import replace

import pytest
import torch

from denoised.models.backbones.dit import DiT
from denoised.models.backbones.mmdit import MMDiT
from denoised.models.backbones.vae import VAEConfig
from denoised.models.checkpoints.model_dir import load_model_dir
from denoised.models.checkpoints.presets import (
    PRESET_NAMES,
    SD3_MEDIUM,
    build_preset,
    build_preset_vae,
    materialize_preset,
)


@pytest.mark.parametrize(
    ("name", "millions"), [("dit-xl-2-256", 675), ("dit-b-2-256", 130), ("dit-s-2-256", 33)]
)
def test_dit_presets_have_released_shapes(name, millions):
    with torch.device("meta"):  # no memory, no init cost
        backbone, config = build_preset(name)
        vae = build_preset_vae(config)
    assert isinstance(backbone, DiT) and backbone.config.input_size == 32
    assert backbone.config.out_channels == 8 and backbone.config.num_classes == 1000
    assert abs(sum(p.numel() for p in backbone.parameters()) / 1e6 - millions) < 0.5
    assert vae.config == VAEConfig() and config["guided_channels"] == 3
    assert config["process"]["type"] == "vp" and config["process"]["prediction"] == "epsilon"


def test_sd3_preset_is_sd3_medium_cut_to_two_blocks():
    with torch.device("meta"):
        backbone, config = build_preset("sd3-medium-depth2")
    assert isinstance(backbone, MMDiT) and config["family"] == "mmdit"
    assert backbone.config.num_layers == 2 and SD3_MEDIUM.num_layers == 24
    assert backbone.config == replace(SD3_MEDIUM, num_layers=2)
    assert abs(sum(p.numel() for p in backbone.parameters()) / 1e6 - 158.75) < 0.01
    assert config["process"] == {
        "type": "flow", "shift": 3.0, "convention": "rf", "num_train_timesteps": 1000,
        "prediction": "velocity",
    }  # fmt: skip
    assert build_preset_vae(config) is None


def test_unet_preset_materializes_and_reloads(tmp_path):
    path = materialize_preset("unet-ddpm-cifar10-32", tmp_path / "unet", seed=3)
    loaded = load_model_dir(path)
    assert loaded.name == "unet-ddpm-cifar10-32" and loaded.vae is None
    assert loaded.latent_shape == (3, 32, 32) and loaded.guided_channels == 0
    same, _ = build_preset("unet-ddpm-cifar10-32", seed=3)
    other, _ = build_preset("unet-ddpm-cifar10-32", seed=4)
    for (key, a), b, c in zip(
        loaded.backbone.state_dict().items(),
        same.state_dict().values(),
        other.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), key
        if a.ndim > 1:
            assert not torch.equal(a, c), key


def test_seeding_leaves_global_rng_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    with torch.device("meta"):
        build_preset("dit-s-2-256", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'dit-xxl'.*dit-xl-2-256"):
        build_preset("dit-xxl")
    assert len(PRESET_NAMES) == 5
