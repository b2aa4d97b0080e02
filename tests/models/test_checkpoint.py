"""Model directories: round trips, and loud, specific refusals of anything inexact or unsafe."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from denoised.models.backbones.dit import DiT, DiTConfig
from denoised.models.backbones.unet import UNet, UNetConfig
from denoised.models.backbones.vae import VAEConfig, VAEDecoder
from denoised.models.checkpoints.model_dir import (
    CONFIG_FILE,
    VAE_WEIGHTS_FILE,
    WEIGHTS_FILE,
    check_model_dir,
    load_model_dir,
    save_model_dir,
)
from denoised.models.checkpoints.presets import DDPM_LINEAR_PROCESS

TINY_DIT = DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=3)
TINY_VAE = VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8)


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    backbone, vae = DiT(TINY_DIT), VAEDecoder(TINY_VAE)
    config = {"process": DDPM_LINEAR_PROCESS, "class_names": ["a", "b", "c"], "guided_channels": 3}
    save_model_dir(tmp_path / "tiny", backbone, config, vae=vae)
    return tmp_path / "tiny", backbone, vae


def test_round_trip(model_dir):
    path, backbone, vae = model_dir
    loaded = load_model_dir(path)
    assert loaded.name == "tiny" and loaded.config["family"] == "dit"
    assert loaded.class_names == ["a", "b", "c"] and loaded.num_classes == 3
    assert loaded.latent_shape == (4, 8, 8) and loaded.image_size == 16
    assert (loaded.out_channels_used, loaded.guided_channels) == (4, 3)
    assert loaded.process.to_config() == DDPM_LINEAR_PROCESS
    assert not loaded.backbone.training
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 700.0]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(loaded.backbone(x, t, y), backbone.eval()(x, t, y))
        z = torch.randn(2, 4, 8, 8)
        decoded = loaded.vae.decode(z)
        assert torch.equal(decoded, vae.eval()(z / 0.18215).clamp(-1, 1))
    assert decoded.shape == (2, 3, 16, 16)


def test_loads_in_another_dtype(model_dir):
    loaded = load_model_dir(model_dir[0], dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.bfloat16}
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 700.0]), torch.tensor([0, 3])
    with torch.no_grad():
        reference = model_dir[1].eval()(x, t, y)
        out = loaded.backbone(x.bfloat16(), t, y)
        image = loaded.vae.decode(out[:, :4])
    assert out.dtype == torch.bfloat16 and image.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= 0.05 * reference.abs().max()


def test_unet_round_trip_without_vae(tmp_path):
    config = UNetConfig(
        sample_size=8,
        block_out_channels=(16, 16),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
    )
    save_model_dir(tmp_path / "u", UNet(config), {"process": DDPM_LINEAR_PROCESS})
    loaded = load_model_dir(tmp_path / "u")
    assert loaded.vae is None and loaded.num_classes is None and loaded.guided_channels == 0
    assert loaded.latent_shape == (3, 8, 8) and loaded.image_size == 8


def rewrite_weights(path, edit):
    state = load_file(path / WEIGHTS_FILE)
    edit(state)
    save_file(state, path / WEIGHTS_FILE)


def test_missing_key_is_named(model_dir):
    path = model_dir[0]
    rewrite_weights(path, lambda s: s.pop("blocks.1.attn.proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks\.1\.attn\.proj\.weight"):
        load_model_dir(path)


def test_extra_key_is_named(model_dir):
    path = model_dir[0]
    rewrite_weights(path, lambda s: s.update({"blocks.9.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): blocks\.9\.extra"):
        load_model_dir(path)


def test_wrong_shape_is_named(model_dir):
    path = model_dir[0]
    rewrite_weights(path, lambda s: s.update({"final_layer.linear.bias": torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"final_layer\.linear\.bias: file \(7,\), model \(32,\)"):
        load_model_dir(path)


def test_all_problems_reported_together(model_dir):
    path = model_dir[0]

    def edit(s):
        s.pop("x_embedder.proj.bias")
        s["surplus"] = torch.zeros(1)
        s["y_embedder.embedding_table.weight"] = torch.zeros(2, 32)

    rewrite_weights(path, edit)
    with pytest.raises(ValueError) as info:
        load_model_dir(path)
    message = str(info.value)
    assert "x_embedder.proj.bias" in message and "surplus" in message
    assert "y_embedder.embedding_table.weight: file (2, 32), model (4, 32)" in message


def test_vae_mismatch_is_named(model_dir):
    path = model_dir[0]
    state = load_file(path / VAE_WEIGHTS_FILE)
    state.pop("post_quant_conv.bias")
    save_file(state, path / VAE_WEIGHTS_FILE)
    with pytest.raises(
        ValueError, match=r"vae\.safetensors.*missing keys \(1\): post_quant_conv\.bias"
    ):
        load_model_dir(path)


def test_truncated_safetensors(model_dir):
    path = model_dir[0]
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        load_model_dir(path)


def test_missing_weights_file(model_dir):
    path = model_dir[0]
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors does not exist"):
        load_model_dir(path)


def test_pickle_file_refused(tmp_path):
    torch.save(DiT(TINY_DIT).state_dict(), tmp_path / "DiT-XL-2-256x256.pt")
    with pytest.raises(ValueError, match=r"is a pickle checkpoint.*denoised convert"):
        load_model_dir(tmp_path / "DiT-XL-2-256x256.pt")


def test_folder_of_pickles_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle checkpoints \(pytorch_model\.bin\).*convert"):
        load_model_dir(tmp_path)


def test_diffusers_folder_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"diffusers pipeline folder.*denoised convert"):
        load_model_dir(tmp_path)


def test_config_errors(model_dir):
    path = model_dir[0]
    config = json.loads((path / CONFIG_FILE).read_text())
    bad = {**config, "class_names": ["only-one"]}
    (path / CONFIG_FILE).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="1 class names but the model has 3 classes"):
        load_model_dir(path)
    bad = {k: v for k, v in config.items() if k != "process"}
    (path / CONFIG_FILE).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="lacks the required key 'process'"):
        load_model_dir(path)
    (path / CONFIG_FILE).write_text(json.dumps({**config, "family": "gan"}))
    with pytest.raises(ValueError, match="unknown model family 'gan'"):
        load_model_dir(path)


def test_save_validates(tmp_path):
    with pytest.raises(ValueError, match="needs a 'process'"):
        save_model_dir(tmp_path / "a", DiT(TINY_DIT), {})
    with pytest.raises(ValueError, match="guided_channels=5"):
        save_model_dir(
            tmp_path / "b", DiT(TINY_DIT), {"process": DDPM_LINEAR_PROCESS, "guided_channels": 5}
        )
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "defaults, message",
    [
        ({"sampler": "dpm++"}, r"defaults\.sampler must be one of ddim, .*got 'dpm\+\+'"),
        ({"steps": -3}, r"defaults\.steps must be an integer ≥ 1, got -3"),
        ({"steps": "20"}, r"defaults\.steps must be an integer ≥ 1, got '20'"),
        ({"steps": True}, r"defaults\.steps must be an integer ≥ 1, got True"),
        ({"guidance_scale": "x"}, r"defaults\.guidance_scale must be a number in 0\.\.100"),
        ({"guidance_scale": 101}, r"defaults\.guidance_scale must be a number in 0\.\.100"),
        ({"size": "64x64"}, r"defaults\.size must be the model's native size '16x16'"),
        ({"eta": 1.0}, r"defaults\.eta is not a serving default \(allowed: sampler, steps"),
        (["dpmpp-2m"], r"defaults must be an object"),
    ],
)
def test_bad_defaults_refused_naming_dir_and_key(model_dir, defaults, message):
    path = model_dir[0]
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**config, "defaults": defaults}))
    with pytest.raises(ValueError, match=rf"^{path / CONFIG_FILE}: {message}"):
        load_model_dir(path)


def test_every_bad_default_reported_together(model_dir):
    path = model_dir[0]
    config = json.loads((path / CONFIG_FILE).read_text())
    bad = {"sampler": "dpm++", "steps": -3, "guidance_scale": "x"}
    (path / CONFIG_FILE).write_text(json.dumps({**config, "defaults": bad}))
    with pytest.raises(ValueError) as info:
        load_model_dir(path)
    assert [p.split(" ")[0] for p in str(info.value).split(": ", 1)[1].split("; ")] == [
        "defaults.sampler",
        "defaults.steps",
        "defaults.guidance_scale",
    ]


def test_good_defaults_load(model_dir):
    path = model_dir[0]
    config = json.loads((path / CONFIG_FILE).read_text())
    good = {"sampler": "heun", "steps": 7, "guidance_scale": 2.5, "size": "16x16"}
    (path / CONFIG_FILE).write_text(json.dumps({**config, "defaults": good}))
    assert load_model_dir(path).config["defaults"] == good


def test_guidance_default_refused_on_a_model_that_cannot_be_guided(tmp_path):
    config = {"process": DDPM_LINEAR_PROCESS, "guided_channels": 0}
    with pytest.raises(ValueError, match=r"defaults\.guidance_scale is 2 but the model cannot"):
        save_model_dir(tmp_path / "g", DiT(TINY_DIT), {**config, "defaults": {"guidance_scale": 2}})
    save_model_dir(tmp_path / "g", DiT(TINY_DIT), {**config, "defaults": {"guidance_scale": 1}})


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_checkpoint_file_named_as_a_file_with_the_convert_command(tmp_path, suffix):
    file = tmp_path / f"weights{suffix}"
    torch.save({}, file)
    message = rf"{file} is a pickle checkpoint.*denoised convert {file}"
    with pytest.raises(ValueError, match=message):
        check_model_dir(file)


def test_other_files_are_named_as_files(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"is a weights file, not a model directory.*convert"):
        load_model_dir(weights)
    config = tmp_path / "config.json"
    config.write_text("{}")
    with pytest.raises(ValueError, match=rf"^{config} is a file, not a model directory"):
        load_model_dir(config)
    with pytest.raises(ValueError, match=r"model directory .*absent does not exist"):
        load_model_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is not a model directory: config\.json is"):
        load_model_dir(tmp_path / "empty")


def test_check_model_dir_accepts_a_model_dir(model_dir):
    assert check_model_dir(str(model_dir[0])) == model_dir[0]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_weights_get_the_mode_of_other_new_files(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_model_dir(
            tmp_path / "m", DiT(TINY_DIT), {"process": DDPM_LINEAR_PROCESS}, VAEDecoder(TINY_VAE)
        )
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    expected = 0o666 & ~umask
    assert modes == {CONFIG_FILE: expected, WEIGHTS_FILE: expected, VAE_WEIGHTS_FILE: expected}
