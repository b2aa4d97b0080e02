"""`denoised serve` without model flags serves the shipped zoo models, and what they return
over HTTP is the digit that was asked for (judged by the zoo's digit classifier), or for the
text model a scene that follows the prompt (judged by the zoo's shapes judge)."""

import io

import httpx
import numpy as np
import pytest
import torch

from denoised.models.zoo.evaluate_text import adherence, adherence_prompts
from denoised.models.zoo.judge import judge_images, load_judge
from denoised.models.zoo.shapes_judge import load_shapes_judge

pytestmark = pytest.mark.e2e

DIGITS = ["digits-dit", "digits-flow", "digits-unet"]
ZOO = [*DIGITS, "shapes-text"]


def test_serve_without_models_serves_the_zoo_and_draws_the_asked_digit(shipped):
    server = shipped
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert [card["id"] for card in cards] == ZOO
    judge = load_judge()
    for card in cards[: len(DIGITS)]:
        assert card["classes"] == [str(i) for i in range(10)] and card["sizes"] == ["8x8"]
        images = []
        for digit in range(10):
            body = {"model": card["id"], "label": str(digit), "n": 2, "seed": digit,
                    "output_format": "npy", "response_format": "bytes"}  # fmt: skip
            response = httpx.post(server.url + "/v1/generate", json=body, timeout=60)
            assert response.status_code == 200, response.text
            images.append(np.load(io.BytesIO(response.content)))
        pixels = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2)  # [20, 1, 8, 8]
        _, predicted = judge_images(judge, pixels * 2 - 1)
        asked = torch.arange(10).repeat_interleave(2)
        accuracy = (predicted == asked).float().mean().item()
        assert accuracy >= 0.8, (card["id"], predicted.tolist())


def test_the_served_text_model_follows_full_attribute_prompts(shipped):
    server = shipped
    (card,) = [c for c in httpx.get(server.url + "/v1/models").json()["data"] if c["id"] == ZOO[-1]]
    assert card["conditioning"] == "text" and card["sizes"] == ["32x32"]
    prompts, scenes = adherence_prompts(8)
    images = []
    for i, prompt in enumerate(prompts):  # the model's defaults: sampler, steps, guidance
        body = {"model": card["id"], "prompt": prompt, "seed": i, "output_format": "npy",
                "response_format": "bytes"}  # fmt: skip
        response = httpx.post(server.url + "/v1/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        images.append(np.load(io.BytesIO(response.content)))
    pixels = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2)  # [8, 3, 32, 32]
    result = adherence(load_shapes_judge(), pixels * 2 - 1, scenes)
    assert result["colour"] >= 0.75 and result["all"] >= 0.25, result
