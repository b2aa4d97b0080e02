"""`denoised convert` on a diffusers DiTPipeline folder, scheduler mapping, and CLI errors."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline
from diffusers_reference import (
    CLASSES,
    SIDE,
    inputs,
    original_layout,
    random_diffusers_dit,
    random_vae,
)

from denoised.models.checkpoint import load_model_dir
from denoised.models.convert import main, process_from_scheduler_config


@pytest.fixture
def dit_pipeline(tmp_path):
    transformer = random_diffusers_dit(seed=7)
    vae = random_vae(seed=8)
    folder = tmp_path / "DiT-tiny"
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    # The released pipelines name the transformer class Transformer2DModel and carry the
    # ImageNet names in model_index.json.
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "_class_name": "Transformer2DModel"})
    )
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {str(i): f"class {i}" for i in reversed(range(CLASSES))}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder, transformer, vae


def test_dit_pipeline_folder(tmp_path, dit_pipeline, capsys):
    folder, transformer, vae = dit_pipeline
    assert main([str(folder), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_model_dir(tmp_path / "out")
    assert loaded.name == "out" and loaded.config["family"] == "dit"
    assert loaded.class_names == [f"class {i}" for i in range(CLASSES)]
    assert loaded.guided_channels == 4  # DiTPipeline guides all latent channels
    assert loaded.latent_shape == (4, SIDE, SIDE) and loaded.image_size == 2 * SIDE
    assert loaded.process.to_config() == process_from_scheduler_config(DDIMScheduler().config)
    x, t, y = inputs(seed=9)
    with torch.no_grad():
        ours, theirs = loaded.backbone(x, t, y), transformer(x, t, y).sample
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
        z = torch.randn(2, 4, SIDE, SIDE)
        images, ref_images = loaded.vae(z), vae.decode(z).sample
        assert (images - ref_images).abs().max() <= 1e-5 * ref_images.abs().max()


def test_scheduler_configs_map_to_processes():
    vp = process_from_scheduler_config(
        {
            "_class_name": "DDPMScheduler",
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction",
            "num_train_timesteps": 4000,
        }
    )
    assert (vp["type"], vp["schedule"], vp["prediction"], vp["num_train_timesteps"]) == (
        "vp",
        "squaredcos_cap_v2",
        "v",
        4000,
    )
    flow = process_from_scheduler_config(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    )
    assert (flow["type"], flow["shift"], flow["prediction"]) == ("flow", 3.0, "velocity")
    with pytest.raises(ValueError, match="prediction_type 'x0'"):
        process_from_scheduler_config({"prediction_type": "x0"})


def test_cli_reports_errors(tmp_path, capsys):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline"}'
    )
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text("{}")
    assert main([str(tmp_path / "pipe"), str(tmp_path / "out")]) == 2
    assert "unsupported diffusers pipeline 'StableDiffusionPipeline'" in capsys.readouterr().out
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pt"), str(tmp_path / "out")]) == 2
    assert "weights-only torch checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_original_checkpoint_with_vae_and_class_names(tmp_path, dit_pipeline):
    folder, transformer, _ = dit_pipeline
    torch.save(original_layout(transformer), tmp_path / "dit.pt")
    (tmp_path / "names.json").write_text(json.dumps([f"n{i}" for i in range(CLASSES)]))
    code = main(
        [
            str(tmp_path / "dit.pt"),
            str(tmp_path / "m"),
            "--vae",
            str(folder / "vae"),
            "--class-names",
            str(tmp_path / "names.json"),
            "--num-heads",
            "2",
        ]
    )
    assert code == 0
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.vae is not None and loaded.class_names[3] == "n3"
    assert loaded.config["vae"]["block_out_channels"] == [32, 64]
