"""`denoised convert` on a diffusers DiTPipeline folder, scheduler mapping, and CLI errors."""

import argparse
import json
import os

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers_reference import (
    CLASSES,
    HEADS,
    SIDE,
    inputs,
    original_layout,
    random_diffusers_dit,
    random_vae,
)

from denoised.models.checkpoints.convert import main, process_from_scheduler_config
from denoised.models.checkpoints.model_dir import load_model_dir


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
        '{"_class_name": "StableDiffusionXLPipeline"}'
    )
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text("{}")
    assert main([str(tmp_path / "pipe"), str(tmp_path / "out")]) == 1
    assert "unsupported diffusers pipeline 'StableDiffusionXLPipeline'" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pt"), str(tmp_path / "out")]) == 1
    assert "is not a torch checkpoint" in capsys.readouterr().err
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
    assert loaded.config["source"] == "original DiT checkpoint dit.pt"


# ---------------------------------------------------------------------------------------------
# Flags on folder sources, training checkpoints, scheduler settings, errors, existing outputs


def test_class_names_replace_a_pipelines_id2label(tmp_path, dit_pipeline):
    folder, _, _ = dit_pipeline
    names = [f"kind {i}" for i in range(CLASSES)]
    (tmp_path / "names.json").write_text(json.dumps(names))
    assert (
        main([str(folder), str(tmp_path / "out"), "--class-names", str(tmp_path / "names.json")])
        == 0
    )
    assert load_model_dir(tmp_path / "out").class_names == names


def test_a_pipelines_repeated_labels_get_their_ids(tmp_path, dit_pipeline):
    """ImageNet's labels name two classes 'crane': a pipeline converts with the later one
    suffixed by its id (a --class-names file with repeats is refused instead)."""
    folder, _, _ = dit_pipeline
    index = json.loads((folder / "model_index.json").read_text())
    labels = {str(i): "Crane" if i == 5 else "crane" if i == 1 else str(i) for i in range(CLASSES)}
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": labels}))
    assert main([str(folder), str(tmp_path / "out")]) == 0
    names = load_model_dir(tmp_path / "out").class_names
    assert names[1] == "crane" and names[5] == "Crane (5)" and len(set(names)) == CLASSES


def test_class_names_on_a_ddpm_pipeline(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=4,  # 3 classes + the null label
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    (tmp_path / "names.json").write_text(json.dumps({"2": "c", "0": "a", "1": "b"}))
    args = [str(tmp_path / "pipe"), str(tmp_path / "out")]
    assert main([*args, "--class-names", str(tmp_path / "names.json")]) == 0
    loaded = load_model_dir(tmp_path / "out")
    assert loaded.class_names == ["a", "b", "c"] and loaded.num_classes == 3
    # A count that disagrees with the model's classes is refused, naming both.
    (tmp_path / "names.json").write_text(json.dumps(["a", "b"]))
    assert main([*args, "--force", "--class-names", str(tmp_path / "names.json")]) == 1


@pytest.mark.parametrize(
    "flags",
    [["--family", "sit"], ["--vae", "nowhere"], ["--num-heads", "3"], ["--input-size", "16"]],
)
def test_checkpoint_flags_are_refused_for_folders(tmp_path, dit_pipeline, flags, capsys):
    folder, _, _ = dit_pipeline
    assert main([str(folder), str(tmp_path / "out"), *flags]) == 2
    out = capsys.readouterr()
    assert out.out == "" and f"{flags[0]} applies only to a .pt checkpoint" in out.err
    assert not (tmp_path / "out").exists()


def test_training_checkpoint_with_namespace_args(tmp_path):
    """DiT's/SiT's train.py layout: model, EMA, optimizer state and an argparse.Namespace."""
    ref = random_diffusers_dit(seed=4)
    ema = original_layout(ref)
    raw = {k: torch.randn_like(v) for k, v in ema.items()}
    params = [torch.nn.Parameter(v.clone()) for v in raw.values()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sum(p.square().sum() for p in params).backward()
    opt.step()
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=CLASSES, epochs=1400)
    checkpoint = {"model": raw, "ema": ema, "opt": opt.state_dict(), "args": args}
    torch.save(checkpoint, tmp_path / "0400000.pt")
    dst = tmp_path / "m"
    assert main([str(tmp_path / "0400000.pt"), str(dst), "--num-heads", str(HEADS)]) == 0
    state = load_model_dir(dst).backbone.state_dict()
    assert state.keys() == ema.keys() - {"pos_embed"}
    assert all(torch.equal(state[k], ema[k]) for k in state)  # the EMA weights, not the raw


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "created-by-unpickling"

    class RunsCode:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    state = original_layout(random_diffusers_dit())
    torch.save({"ema": state, "args": RunsCode()}, tmp_path / "evil.pt")
    assert main([str(tmp_path / "evil.pt"), str(tmp_path / "out"), "--num-heads", "2"]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "mkdir" in err and len(err.splitlines()) == 1
    assert not marker.exists()


def test_scheduler_settings_that_change_the_process_are_refused():
    for config, key in [
        (DDPMScheduler(rescale_betas_zero_snr=True).config, "rescale_betas_zero_snr"),
        (DDPMScheduler(beta_schedule="sigmoid").config, "beta_schedule"),
        (DDPMScheduler(prediction_type="x0").config, "prediction_type"),
        (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config, "use_dynamic_shifting"),
    ]:
        with pytest.raises(ValueError, match=key):
            process_from_scheduler_config(dict(config))


def test_sampling_time_scheduler_settings_are_accepted():
    """Sampling choices (variance, x0 clipping, thresholding, spacing) leave the process as is;
    the process is what the betas and prediction type define."""
    base = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    plain = process_from_scheduler_config(dict(DDPMScheduler(**base).config))
    sampling = DDPMScheduler(
        **base,
        variance_type="fixed_large",
        clip_sample=True,
        thresholding=True,
        timestep_spacing="trailing",
        steps_offset=1,
    ).config
    assert process_from_scheduler_config(dict(sampling)) == plain
    assert (plain["schedule"], plain["beta_start"], plain["beta_end"]) == (
        "scaled_linear",
        0.00085,
        0.012,
    )


@pytest.fixture
def sources(tmp_path, dit_pipeline):
    """A DiT pipeline folder and the same weights as an original .pt state dict."""
    folder, transformer, _ = dit_pipeline
    torch.save(original_layout(transformer), tmp_path / "dit.pt")
    return tmp_path, folder


def _drop(tmp_path, key):
    state = torch.load(tmp_path / "dit.pt", weights_only=True)
    del state[key]
    torch.save(state, tmp_path / "dit.pt")


def _write(path, text):
    path.write_text(text)


# (prepare(tmp, folder), args(tmp, folder), exit code, text the one-line error contains)
ERRORS = {
    "no final layer": (
        lambda t, f: _drop(t, "final_layer.linear.weight"),
        lambda t, f: [t / "dit.pt", t / "out", "--num-heads", "2"],
        1,
        "final_layer.linear.weight is missing",
    ),
    "unconditional": (
        lambda t, f: _drop(t, "y_embedder.embedding_table.weight"),
        lambda t, f: [t / "dit.pt", t / "out", "--num-heads", "2"],
        1,
        "unconditional DiT/SiT checkpoints are not supported",
    ),
    "zero heads": (
        None,
        lambda t, f: [t / "dit.pt", t / "out", "--num-heads", "0"],
        2,
        "--num-heads",
    ),
    "heads not dividing": (
        None,
        lambda t, f: [t / "dit.pt", t / "out", "--num-heads", "3"],
        1,
        "3 attention heads do not divide the hidden size 32",
    ),
    "input size disagrees": (
        None,
        lambda t, f: [t / "dit.pt", t / "out", "--num-heads", "2", "--input-size", "16"],
        1,
        "latent size 16 disagrees with the stored pos_embed, which is for 8",
    ),
    "missing class names file": (
        None,
        lambda t, f: [t / "dit.pt", t / "out", "--class-names", t / "nowhere.json"],
        2,
        "nowhere.json does not exist",
    ),
    "duplicate class names": (
        lambda t, f: _write(t / "names.json", json.dumps(["cat", "dog", "Cat"])),
        lambda t, f: [t / "dit.pt", t / "out", "--class-names", t / "names.json"],
        2,
        "classes 0 and 2 are both named 'Cat'",
    ),
    "output is a file": (
        lambda t, f: _write(t / "out", "x"),
        lambda t, f: [t / "dit.pt", t / "out", "--num-heads", "2"],
        2,
        "is an existing file",
    ),
    "bad scheduler json": (
        lambda t, f: _write(f / "scheduler" / "scheduler_config.json", "{oops"),
        lambda t, f: [f, t / "out"],
        1,
        "scheduler_config.json is not valid JSON",
    ),
    "zero snr": (
        lambda t, f: _write(
            f / "scheduler" / "scheduler_config.json", '{"rescale_betas_zero_snr": true}'
        ),
        lambda t, f: [f, t / "out"],
        1,
        "rescale_betas_zero_snr=True is not supported",
    ),
    "transformer config lacks a key": (
        lambda t, f: _write(
            f / "transformer" / "config.json",
            json.dumps(
                {
                    k: v
                    for k, v in json.loads((f / "transformer" / "config.json").read_text()).items()
                    if k != "num_layers"
                }
            ),
        ),
        lambda t, f: [f, t / "out"],
        1,
        "the DiT transformer config lacks num_layers",
    ),
    "not torch": (
        lambda t, f: _write(t / "dit.pt", "e" * 100),
        lambda t, f: [t / "dit.pt", t / "out"],
        1,
        "is not a torch checkpoint",
    ),
    "bad name": (
        None,
        lambda t, f: [t / "dit.pt", t / "out", "--name", "bad name/with slash"],
        2,
        "'bad name/with slash' is not a valid model id",
    ),
    "vae given the pipeline root": (
        None,
        lambda t, f: [t / "dit.pt", t / "out", "--num-heads", "2", "--vae", f],
        1,
        f"holds one: pass {os.sep}",
    ),
}


@pytest.mark.parametrize("case", ERRORS)
def test_cli_errors_are_one_line_on_stderr(sources, case, capsys):
    tmp_path, folder = sources
    prepare, args, code, text = ERRORS[case]
    if prepare is not None:
        prepare(tmp_path, folder)
    assert main([str(a) for a in args(tmp_path, folder)]) == code
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("denoised convert: error: ") and len(out.err.splitlines()) == 1
    assert text in out.err
    assert not (tmp_path / "out").is_dir()


def test_existing_output_needs_force_and_loses_stale_files(tmp_path, sources, capsys):
    _, folder = sources
    dst = tmp_path / "out"
    base = [str(tmp_path / "dit.pt"), str(dst), "--num-heads", "2"]
    assert main([*base, "--vae", str(folder / "vae")]) == 0
    (dst / "notes.txt").write_text("mine")
    assert (dst / "vae.safetensors").is_file()
    capsys.readouterr()
    assert main(base) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert load_model_dir(dst).vae is not None  # untouched
    assert main([*base, "--force", "--family", "sit"]) == 0
    loaded = load_model_dir(dst)
    assert loaded.vae is None and not (dst / "vae.safetensors").exists()
    assert loaded.config["source"] == "original SiT checkpoint dit.pt"
    assert (dst / "notes.txt").read_text() == "mine"  # only the model's own files are replaced
