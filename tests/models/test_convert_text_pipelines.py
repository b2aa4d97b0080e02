"""`denoised convert` on Stable Diffusion (1.x/2.x) and Stable Diffusion 3 pipeline folders,
proven against diffusers' own pipelines: tiny random-weight pipelines saved with
`save_pretrained`, converted by the CLI's function and loaded as model directories, then
sampled by our samplers with our prompt encoding, backbone and VAE decoder, and by the
pipeline's `__call__` read from the same folder — same initial latents, prompt, negative
prompt and guidance scale, the matching scheduler on the same grid. Float32; latents within
1e-4 × their largest value, images (in [0, 1]) within 1e-4. Then the refusals, and a converted
folder served over HTTP.

Grids: our `ddim` on the `leading` spacing is DDIMScheduler with `steps_offset` 0 and
`set_alpha_to_one` (the folders' scheduler has SD's released settings, `steps_offset` 1 and
`set_alpha_to_one` false: sampling-time settings the converter does not carry over, which
shift diffusers' grid by one timestep and end it at ᾱ_0 rather than 1). Our default
`dpmpp-2m` is DPMSolverMultistepScheduler with `trailing` spacing. Our `euler` on SD3's flow
process is FlowMatchEulerDiscreteScheduler handed our unshifted σ's (by default it shifts its
σ_min twice: tests/models/test_samplers_diffusers.py).
"""

import base64
import io
import json
import re
import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from fastapi.testclient import TestClient
from PIL import Image
from text_fixtures import sd3_pipeline, sd_pipeline

from denoised.models.checkpoints.convert import convert_diffusers_pipeline, main
from denoised.models.checkpoints.model_dir import LoadedModel, load_model_dir
from denoised.models.conditioning import Conditioning
from denoised.models.sampling.samplers import create_sampler, sample
from denoised.server.http.api import create_app
from denoised.server.settings import Settings

PROMPT, NEGATIVE = "a photo of a red cat", "the blue sky"
STEPS, N, SCALE = 6, 2, 4.5
# SD's released DDIM settings (stable-diffusion-2-1's scheduler_config.json).
SD_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)


def save_sd(folder, prediction: str = "epsilon"):
    pipe = sd_pipeline(seed=3)
    scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction)
    StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"], ids=["eps", "v"])
def sd(request, tmp_path_factory):
    """(pipeline folder, converted model): SD 1.x-like (ε) and SD 2.x-768-like (v)."""
    root = tmp_path_factory.mktemp("sd")
    folder = save_sd(root / "pipeline", request.param)
    return folder, load_model_dir(convert_diffusers_pipeline(folder, root / "converted"))


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no-t5"])
def sd3(request, tmp_path_factory):
    """(pipeline folder, converted model): SD3 with SD3's VAE and shift, with and without T5."""
    root = tmp_path_factory.mktemp("sd3")
    folder = root / "pipeline"
    sd3_pipeline(seed=5, t5=request.param, sd3_vae=True).save_pretrained(folder)
    return folder, load_model_dir(convert_diffusers_pipeline(folder, root / "converted"))


def ours(model: LoadedModel, sampler: str, options: dict | None = None):
    """(initial latents, final latents, images [N, H, W, 3] in [0, 1]) from our code."""
    prompt, negative = model.text.encode([PROMPT, NEGATIVE])
    cache = getattr(model.backbone, "text_cache", None)  # the text UNet's, as served
    inputs = [p.context() if cache is None else cache(p.context()) for p in (prompt, negative)]
    conditioning = Conditioning.prompts(N, *inputs, SCALE)
    shape = (N, *model.latent_shape)
    state = create_sampler(
        sampler, model.process, STEPS, shape, torch.Generator().manual_seed(0), options
    )
    x_init = state.x.clone()
    with torch.no_grad():
        latents = sample(model.backbone, state, conditioning, model.guided_channels)
        images = (model.vae.decode(latents) + 1) / 2
    return x_init, latents, images.permute(0, 2, 3, 1).numpy()


def theirs(pipe, x_init: torch.Tensor, **kwargs):
    """(final latents, images [N, H, W, 3] in [0, 1]) from the pipeline's `__call__`."""
    final = {}

    def keep_latents(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    pipe.set_progress_bar_config(disable=True)
    side = x_init.shape[-1] * pipe.vae_scale_factor
    images = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=SCALE,
        num_images_per_prompt=N,
        latents=x_init.clone(),
        height=side,
        width=side,
        output_type="np",
        callback_on_step_end=keep_latents,
        **kwargs,
    ).images
    return final["latents"], images


def assert_equal_runs(ours_run, pipe, **kwargs) -> None:
    x_init, latents, images = ours_run
    ref_latents, ref_images = theirs(pipe, x_init, **kwargs)
    scale = ref_latents.abs().max().item()
    err = (latents - ref_latents).abs().max().item()
    assert err <= 1e-4 * scale, f"latents: max |ours − diffusers| = {err:.3g} (scale {scale:.3g})"
    assert ((ref_images > 0) & (ref_images < 1)).mean() > 0.05  # not all clipped away
    err = np.abs(images - ref_images).max()
    assert err <= 1e-4, f"images: max |ours − diffusers| = {err:.3g}"


@pytest.mark.parametrize(
    ("sampler", "options", "scheduler"),
    [
        ("ddim", {"spacing": "leading"}, {"steps_offset": 0, "set_alpha_to_one": True}),
        ("dpmpp-2m", {}, {"timestep_spacing": "trailing"}),
    ],
    ids=["ddim", "dpmpp-2m"],
)
def test_sd_pipeline_samples_as_diffusers_does(sd, sampler, options, scheduler):
    folder, model = sd
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cls = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    # Set after construction: the pipeline's __init__ rewrites steps_offset to 1.
    pipe.scheduler = cls.from_config(saved, **scheduler)
    assert_equal_runs(ours(model, sampler, options), pipe)


def test_sd_conversion(sd):
    folder, model = sd
    prediction = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert model.config["family"] == "unet-text" and model.text is not None
    assert model.config["process"] == {
        "type": "vp",
        "schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "prediction": {"epsilon": "epsilon", "v_prediction": "v"}[prediction["prediction_type"]],
    }
    # The folder's DDIM scheduler and StableDiffusionPipeline's call defaults.
    assert model.config["defaults"] == {"sampler": "ddim", "steps": 50, "guidance_scale": 7.5}
    assert (model.latent_shape, model.image_size, model.guided_channels) == ((4, 8, 8), 16, 4)


def test_sd3_pipeline_samples_as_diffusers_does(sd3):
    folder, model = sd3
    no_t5 = {} if model.text.t5 is not None else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **no_t5)
    sigmas = list(np.linspace(1.0, 1.0 / 1000, STEPS))  # unshifted; the scheduler shifts them
    assert_equal_runs(ours(model, "euler"), pipe, sigmas=sigmas)


def test_sd3_conversion(sd3):
    _, model = sd3
    assert model.config["family"] == "mmdit"
    assert model.config["process"] == {
        "type": "flow",
        "shift": 3.0,
        "convention": "rf",
        "num_train_timesteps": 1000,
        "prediction": "velocity",
    }
    assert model.config["defaults"] == {"sampler": "euler", "steps": 28, "guidance_scale": 7.0}
    assert (model.vae.config.latent_channels, model.vae.config.shift_factor) == (16, 0.0609)
    assert model.latent_shape == (16, 8, 8) and model.image_size == 16


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_sd(tmp_path_factory.mktemp("sd-folder") / "pipeline")


@pytest.fixture
def sd_copy(sd_folder, tmp_path):
    """A fresh copy of the saved SD pipeline folder, to break."""
    return shutil.copytree(sd_folder, tmp_path / "pipeline")


def edit_index(folder, **changes) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **changes}))


def test_released_layout_converts_without_its_safety_checker_pickles_or_variants(sd_copy, tmp_path):
    """A released SD folder names a safety checker and its image processor (not converted:
    no folders needed), and holds pickled and fp16 copies of the text encoder's weights,
    which are not copied into the model directory."""
    edit_index(
        sd_copy,
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
        image_encoder=[None, None],
    )
    encoder = sd_copy / "text_encoder"
    (encoder / "pytorch_model.bin").write_bytes(b"never unpickled")
    shutil.copy(encoder / "model.safetensors", encoder / "model.fp16.safetensors")
    assert main([str(sd_copy), str(tmp_path / "out")]) == 0
    text = tmp_path / "out" / "text"
    assert sorted(p.name for p in text.iterdir()) == [
        "model_index.json",
        "text_encoder",
        "tokenizer",
    ]
    assert sorted(p.name for p in (text / "text_encoder").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    index = json.loads((text / "model_index.json").read_text())
    assert set(index) == {"_class_name", "_diffusers_version", "text_encoder", "tokenizer"}
    assert load_model_dir(tmp_path / "out").text is not None


def break_pickled_encoder(folder) -> None:
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"never unpickled")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (break_pickled_encoder, r"text_encoder/pytorch_model.bin holds pickled weights and "),
        (
            lambda f: shutil.rmtree(f / "tokenizer"),
            r"tokenizer is missing \(model_index.json names",
        ),
        (lambda f: edit_index(f, tokenizer=[None, None]), r"model_index.json names no tokenizer$"),
        (
            lambda f: edit_index(f, _class_name="StableDiffusionXLPipeline"),
            r"unsupported diffusers pipeline 'StableDiffusionXLPipeline'; supported: DiTPipeline, "
            r"DDPMPipeline, StableDiffusionPipeline, StableDiffusion3Pipeline$",
        ),
        (
            lambda f: edit_index(
                f, image_encoder=["transformers", "CLIPVisionModelWithProjection"]
            ),
            r"component image_encoder \(CLIPVisionModelWithProjection\) is not supported in a "
            r"StableDiffusionPipeline$",
        ),
        (
            lambda f: edit_index(f, unet=["diffusers", "UNetMotionModel"]),
            r"unet is \['diffusers', 'UNetMotionModel'\]; expected \['diffusers', "
            r"'UNet2DConditionModel'\]$",
        ),
        (
            lambda f: edit_index(f, text_encoder=["transformers", "CLIPTextModelWithProjection"]),
            r"text_encoder is a CLIPTextModelWithProjection; supported: CLIPTextModel$",
        ),
        (
            lambda f: DDIMScheduler(rescale_betas_zero_snr=True).save_config(f / "scheduler"),
            r"scheduler rescale_betas_zero_snr=True is not supported: it changes the noise process",
        ),
        (
            lambda f: FlowMatchEulerDiscreteScheduler().save_config(f / "scheduler"),
            r"describes a flow process; a StableDiffusionPipeline needs a VP scheduler$",
        ),
    ],
    ids=[
        "pickled-encoder",
        "no-tokenizer-folder",
        "no-tokenizer",
        "pipeline-class",
        "image-encoder",
        "backbone-class",
        "encoder-class",
        "zero-snr",
        "flow-scheduler",
    ],
)
def test_refusals_are_one_line_errors_and_write_nothing(
    sd_copy, tmp_path, capsys, breakage, message
):
    breakage(sd_copy)
    assert main([str(sd_copy), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("denoised convert: error: ") and err.count("\n") == 1, err
    assert re.search(message, err.strip()), err
    assert not (tmp_path / "out").exists()


def test_class_names_are_a_usage_error_for_a_text_pipeline(sd_copy, tmp_path, capsys):
    names = tmp_path / "names.json"
    names.write_text('["cat", "dog"]')
    assert main([str(sd_copy), str(tmp_path / "out"), "--class-names", str(names)]) == 2
    assert "--class-names does not apply" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_force_overwrites_a_converted_model(sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sd_folder), str(out)]) == 0
    assert main([str(sd_folder), str(out)]) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert main([str(sd_folder), str(out), "--force", "--name", "sd-tiny"]) == 0
    assert load_model_dir(out).name == "sd-tiny"


def test_a_converted_sd_pipeline_serves_text_to_image(sd_folder, tmp_path):
    out = convert_diffusers_pipeline(sd_folder, tmp_path / "sd-tiny")
    with TestClient(create_app(Settings(models=(str(out),)))) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.05)
        body = {"model": "sd-tiny", "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 3}
        response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert (image.format, image.size, image.mode) == ("PNG", (16, 16), "RGB")
