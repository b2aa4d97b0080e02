"""Text-to-image on a real server: a tiny SD3-layout model (MMDiT + CLIP-L, CLIP-G and T5
encoders, random weights) served beside a class-conditional one. The official OpenAI SDK
generates from a text prompt; a concurrent mix of prompts, negative prompts, guidance,
samplers and steps on both models answers each request as it answers it alone; prompts are
encoded once and cached; bad text input is a 422 naming the field."""

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from serving_helpers import metric_samples, npy_images, value
from tiny_models import write_tiny_text_model

pytestmark = pytest.mark.e2e

IMAGES = "/v1/images/generations"


@pytest.fixture(scope="module")
def text_server(launch, tmp_path_factory):
    """tiny-dit and tiny-flow (class models) and tiny-text."""
    return launch("--model", str(write_tiny_text_model(tmp_path_factory.mktemp("text"))))


def test_models_say_what_they_condition_on(text_server):
    cards = {m["id"]: m for m in httpx.get(text_server.url + "/v1/models").json()["data"]}
    assert (cards["tiny-text"]["conditioning"], cards["tiny-text"]["architecture"]) == (
        "text", "mmdit",
    )  # fmt: skip
    assert cards["tiny-text"]["max_prompt_tokens"] == 256  # T5's max_sequence_length
    assert (cards["tiny-dit"]["conditioning"], cards["tiny-dit"]["max_prompt_tokens"]) == (
        "class", None,
    )  # fmt: skip


def test_the_openai_sdk_generates_from_a_text_prompt(text_server):
    with openai.OpenAI(base_url=text_server.url + "/v1", api_key="-", max_retries=0) as sdk:
        result = sdk.images.generate(model="tiny-text", prompt="a photo of a red cat", n=2)
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [(i.format, i.size, i.mode) for i in images] == [("PNG", (8, 8), "RGB")] * 2


def mixed_bodies() -> list[dict]:
    """24 requests: text ones with prompts of different lengths, with and without negative
    prompts and guidance, several samplers and step counts; class ones beside them."""
    prompts = ["a cat", "a photo of the red dog on the blue sky", "the astronaut", ""]
    samplers = [("euler", 6), ("dpmpp-2m", 5), ("heun", 3), ("ddim", 7)]
    bodies = []
    for i in range(18):
        sampler, steps = samplers[i % 4]
        body = {
            "model": "tiny-text",
            "prompt": prompts[i % 4],
            "sampler": sampler,
            "steps": steps,
            "seed": 100 + i,
            "n": 1 + i % 2,
            "output_format": "npy",
        }
        if i % 3 == 0:
            body["guidance_scale"] = 1.0  # unguided
        elif i % 3 == 1:
            body["negative_prompt"] = ["blue", "a dog on the sky"][i % 2]
        bodies.append(body)
    for i in range(6):
        bodies.append({"model": "tiny-dit", "prompt": str(i), "steps": 4 + i, "seed": 200 + i,
                       "guidance_scale": 1.0 + i % 2, "output_format": "npy"})  # fmt: skip
    return bodies


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=180) as client:
        return await asyncio.gather(*(client.post(IMAGES, json=b) for b in bodies))


def test_24_concurrent_mixed_requests_each_equal_their_run_alone(text_server):
    bodies = mixed_bodies()
    before = metric_samples(text_server.url)
    together = asyncio.run(post_all(text_server.url, bodies))
    assert [r.status_code for r in together] == [200] * 24, [r.text for r in together]
    after = metric_samples(text_server.url)
    forwards = value(after, "denoised_batch_requests_count", model="tiny-text") - value(
        before, "denoised_batch_requests_count", model="tiny-text"
    )
    requests = value(after, "denoised_batch_requests_sum", model="tiny-text") - value(
        before, "denoised_batch_requests_sum", model="tiny-text"
    )
    assert requests / forwards > 1.5  # text requests of all kinds shared forwards
    for body, response in zip(bodies, together, strict=True):
        alone = httpx.post(text_server.url + IMAGES, json=body, timeout=60)
        assert alone.status_code == 200, alone.text
        for a, b in zip(npy_images(alone.json()), npy_images(response.json()), strict=True):
            np.testing.assert_allclose(b, a, atol=1e-4, rtol=0, err_msg=str(body))
    text = [r.json() for r, b in zip(together, bodies, strict=True) if b["model"] == "tiny-text"]
    assert all(r["prompt_tokens"] >= 1 and r["truncated"] is False for r in text)


def test_the_prompt_steers_the_image_and_guidance_uses_the_negative_prompt(text_server):
    base = {"model": "tiny-text", "prompt": "a red cat", "seed": 7, "output_format": "npy",
            "guidance_scale": 4.0}  # fmt: skip
    variants = [base, {**base, "prompt": "the blue sky"}, {**base, "negative_prompt": "a dog"}]
    images = [npy_images(r.json())[0] for r in asyncio.run(post_all(text_server.url, variants))]
    assert np.abs(images[0] - images[1]).max() > 1e-3
    assert np.abs(images[0] - images[2]).max() > 1e-3


def test_prompts_are_encoded_once_and_then_come_from_the_cache(text_server):
    prompt = "a dog on the red sky"  # used by no other test
    body = {"model": "tiny-text", "prompt": prompt, "steps": 2, "guidance_scale": 1.0}
    samples = [metric_samples(text_server.url)]
    for _ in range(2):
        assert httpx.post(text_server.url + IMAGES, json=body, timeout=60).status_code == 200
        samples.append(metric_samples(text_server.url))
    hits, misses = (
        [value(s, f"denoised_prompt_cache_{kind}_total", model="tiny-text") for s in samples]
        for kind in ("hits", "misses")
    )
    assert (misses[1] - misses[0], hits[1] - hits[0]) == (1, 0)  # encoded the first time
    assert (misses[2] - misses[1], hits[2] - hits[1]) == (0, 1)  # then found in the cache


def test_a_prompt_longer_than_the_encoders_read_is_truncated_and_said_so(text_server):
    long = " ".join(["astronaut"] * 300)  # well over T5's 256 tokens
    body = {"model": "tiny-text", "prompt": long, "steps": 2, "guidance_scale": 1.0}
    response = httpx.post(text_server.url + "/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["truncated"] is True and response.json()["prompt_tokens"] > 256


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "tiny-text", "prompt": 5}, "prompt", "valid string"),
        ({"model": "tiny-text", "prompt": "x" * 4001}, "prompt", "4000"),
        (
            {"model": "tiny-text", "prompt": "a", "negative_prompt": "b" * 4001},
            "negative_prompt",
            "4000",
        ),
        (
            {"model": "tiny-text", "prompt": "a", "negative_prompt": "b", "guidance_scale": 1},
            "negative_prompt",
            "needs guidance",
        ),
        (
            {"model": "tiny-dit", "prompt": "3", "negative_prompt": "4"},
            "negative_prompt",
            "not text",
        ),
        ({"model": "tiny-text", "label": "3"}, "label", "send a prompt"),
    ],
)
def test_bad_text_input_is_a_422_naming_the_field(text_server, body, param, words):
    endpoint = "/v1/generate" if "label" in body else IMAGES
    response = httpx.post(text_server.url + endpoint, json=body, timeout=30)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    ok = {"model": "tiny-text", "prompt": "a cat", "steps": 1, "guidance_scale": 1.0}
    assert httpx.post(text_server.url + IMAGES, json=ok, timeout=30).status_code == 200
