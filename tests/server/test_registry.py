"""Which models are class-conditional, how labels resolve, and a bad `defaults` entry that
fails only its own model: on a DiT preset (1000 classes, no names) through the registry, and
on tiny model directories through the HTTP API."""

import asyncio
import json
import shutil
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_http_api import error_of, images_of
from tiny_models import write_tiny_models, write_unnamed_dit

from denoised.models.backbones.unet import UNet, UNetConfig
from denoised.models.checkpoints.model_dir import save_model_dir
from denoised.models.checkpoints.presets import DDPM_LINEAR_PROCESS, materialize_preset
from denoised.server.admission import FieldError, GenerationRequest, admit
from denoised.server.engine.jobs import Job
from denoised.server.engine.loop import Engine
from denoised.server.http.api import create_app, model_card
from denoised.server.metrics import Metrics
from denoised.server.registry import load_registry
from denoised.server.settings import Settings

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def preset_registry(tmp_path_factory):
    path = materialize_preset("dit-s-2-256", tmp_path_factory.mktemp("preset") / "dit-s")
    return load_registry([path], CPU, torch.float32)


@pytest.fixture(scope="module")
def preset(preset_registry):
    return preset_registry.get(None)


def prepare(served, label, **fields):
    params, _ = admit(
        served, GenerationRequest(label=label, steps=2, **fields), Settings(), "req", CPU
    )
    return params


def test_a_preset_without_class_names_is_conditional_on_its_class_ids(preset):
    card = model_card(preset)
    assert (card.classes, card.num_classes) == (None, 1000)
    for label, name in ((1, "1"), ("999", "999"), (" 0 ", "0")):
        params = prepare(preset, label, guidance_scale=4.0)
        assert (params.label, params.label_name) == (int(name), name)
        assert (params.guidance_scale, params.guided) == (4.0, True)
    plain = prepare(preset, None)
    assert (plain.label, plain.guidance_scale, plain.guided) == (None, 1.0, False)


@pytest.mark.parametrize(
    ("label", "words"),
    [
        (1000, "class id must be in 0..999, got 1000"),
        (-1, "class id must be in 0..999, got -1"),
        ("1000", "class id must be in 0..999, got '1000'"),
        ("9" * 5000, "class id must be in 0..999"),
        ("cat", "has no class names: give a class id 0..999, got 'cat'"),
        ("1.5", "give a class id 0..999"),
        ("٣", "give a class id 0..999"),
    ],
)
def test_a_label_outside_the_class_ids_names_the_range(preset, label, words):
    with pytest.raises(FieldError) as info:
        prepare(preset, label)
    assert info.value.param == "label" and words in info.value.message


def test_a_preset_generates_by_class_id_with_guidance(preset_registry, preset):
    """Through the engine (VAE decoding included): the id and the scale both reach it."""
    engine = Engine(preset_registry, Settings(compile=False, warmup=False), Metrics(), CPU)

    async def generate(label, guidance_scale):
        request = GenerationRequest(label=label, steps=2, seed=0, guidance_scale=guidance_scale)
        params, state = admit(preset, request, engine.settings, "r", CPU)
        job = Job(params, state, asyncio.get_running_loop())
        engine.submit(job)
        return (await job.result).pixels[0]

    async def run():
        engine.start()
        return await asyncio.gather(generate(1, 4.0), generate("2", 4.0), generate(1, 1.0))

    try:
        guided, other_class, unguided = asyncio.run(run())
    finally:
        engine.stop()
    assert guided.shape == (256, 256, 3) and np.isfinite(guided).all()
    assert np.abs(guided - other_class).max() > 1e-3
    assert np.abs(guided - unguided).max() > 1e-3


def test_guidance_without_a_label_is_refused_as_before(preset):
    with pytest.raises(FieldError, match="this request has no label"):
        prepare(preset, None, guidance_scale=3.0)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    named = write_tiny_models(root)["tiny-dit"]
    bad = root / "bad-defaults"
    shutil.copytree(named, bad)
    config = json.loads((bad / "config.json").read_text())
    config.pop("name", None)
    config["defaults"] = {"sampler": "dpm++", "steps": -3, "guidance_scale": "x"}
    (bad / "config.json").write_text(json.dumps(config))
    return {"named": named, "ids": write_unnamed_dit(root), "bad": bad}


@pytest.fixture(scope="module")
def client(dirs):
    """Warm-up on: it used to run the bad model's defaults and fail the whole server."""
    settings = Settings(
        compile=False, models=(str(dirs["named"]), str(dirs["ids"]), str(dirs["bad"]))
    )
    client = TestClient(create_app(settings))
    with client:
        deadline = time.monotonic() + 60
        while client.get("/ready").json()["status"] == "loading":
            assert time.monotonic() < deadline, "the models did not load in 60 s"
            time.sleep(0.05)
        yield client


def test_a_bad_defaults_entry_fails_only_its_model(client):
    ready = client.get("/ready")
    assert ready.status_code == 503  # strict readiness: a configured model is missing
    body = ready.json()
    assert (body["status"], body["models"]) == ("degraded", ["tiny-dit", "tiny-ids"])
    reason = body["detail"]["unavailable"]["bad-defaults"]
    assert reason.startswith("ValueError: ") and "bad-defaults/config.json" in reason
    for key in ("defaults.sampler", "defaults.steps", "defaults.guidance_scale"):
        assert key in reason
    for model in ("tiny-dit", "tiny-ids"):
        response = client.post("/v1/generate", json={"model": model, "label": 2, "steps": 2})
        assert response.status_code == 200, response.text
    error = error_of(client.post("/v1/generate", json={"model": "bad-defaults"}), 503)
    assert "defaults.sampler" in error["message"]


def test_models_lists_the_class_count_and_names_when_present(client):
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert (cards["tiny-ids"]["classes"], cards["tiny-ids"]["num_classes"]) == (None, 10)
    assert cards["tiny-dit"]["classes"] == [str(i) for i in range(10)]
    assert cards["tiny-dit"]["num_classes"] == 10


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_class_ids_generate_what_the_named_model_does(client, guidance_scale):
    """`tiny-ids` has `tiny-dit`'s weights: its ids must give the named model's images."""
    body = {"steps": 3, "seed": 11, "guidance_scale": guidance_scale}
    reference = images_of(client, "/v1/generate", {**body, "model": "tiny-dit", "label": "3"})
    for path, label in (("/v1/generate", {"label": 3}), ("/v1/generate", {"label": "3"}),
                        ("/v1/images/generations", {"prompt": " 3 "})):  # fmt: skip
        got = images_of(client, path, {**body, "model": "tiny-ids", **label})
        np.testing.assert_array_equal(got[0], reference[0])
    other = images_of(client, "/v1/generate", {**body, "model": "tiny-ids", "label": 4})
    assert np.abs(other[0] - reference[0]).max() > 1e-3  # the label reaches the backbone
    response = client.post("/v1/generate", json={**body, "model": "tiny-ids", "label": 3})
    assert (response.json()["label"], response.json()["guidance_scale"]) == ("3", guidance_scale)


def test_unconditional_generation_of_an_unnamed_model_uses_the_null_class(client):
    body = {"steps": 3, "seed": 2}
    reference = images_of(client, "/v1/generate", {**body, "model": "tiny-dit"})
    got = images_of(client, "/v1/generate", {**body, "model": "tiny-ids"})
    np.testing.assert_array_equal(got[0], reference[0])


@pytest.mark.parametrize(
    ("path", "field", "value", "words"),
    [
        ("/v1/generate", "label", 10, "class id must be in 0..9, got 10"),
        ("/v1/images/generations", "prompt", "10", "class id must be in 0..9, got '10'"),
        ("/v1/images/generations", "prompt", "three", "has no class names: give a class id"),
    ],
)
def test_an_unnamed_models_bad_class_id_is_422_naming_the_range(client, path, field, value, words):
    response = client.post(path, json={"model": "tiny-ids", field: value, "steps": 2})
    error = error_of(response, 422)
    assert error["param"] == field and words in error["message"]


def test_a_conditional_model_without_a_null_class_needs_a_label(tmp_path):
    """A UNet trained on classes but without the null row cannot serve unlabelled or guided
    requests: both are 422s naming the field (they used to fail in the forward, a 500), and
    the warm-up runs labelled and unguided."""
    torch.manual_seed(0)
    unet = UNet(
        UNetConfig(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
            num_classes=3, null_label=False,
        )
    )  # fmt: skip
    path = save_model_dir(tmp_path / "no-null", unet, {"process": dict(DDPM_LINEAR_PROCESS)})
    registry = load_registry([path], CPU, torch.float32)
    served = registry.get(None)
    with pytest.raises(FieldError, match="needs a label: it has no null class") as missing:
        prepare(served, None)
    assert missing.value.param == "label"
    with pytest.raises(FieldError, match="cannot be guided") as guided:
        prepare(served, 2, guidance_scale=3.0)
    assert guided.value.param == "guidance_scale"
    params = prepare(served, 2)
    assert (params.label, params.guidance_scale, params.guided) == (2, 1.0, False)
    Engine(registry, Settings(compile=False), Metrics(), CPU).warm_up()
    assert list(registry.models) == ["no-null"] and not registry.unavailable


def test_a_text_backbone_without_its_encoders_is_not_served(tmp_path):
    from denoised.models.backbones.mmdit import MMDiT, MMDiTConfig
    from denoised.models.checkpoints.presets import SD3_PROCESS

    config = MMDiTConfig(sample_size=8, in_channels=4, num_layers=1, attention_head_dim=8,
                         num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                         pooled_projection_dim=12, pos_embed_max_size=8)  # fmt: skip
    bare = save_model_dir(tmp_path / "bare", MMDiT(config), {"process": SD3_PROCESS})
    plain = write_unnamed_dit(tmp_path)
    registry = load_registry([bare, plain], CPU, torch.float32)
    assert list(registry.models) == ["tiny-ids"]
    assert "without its text encoders" in registry.unavailable["bare"]
